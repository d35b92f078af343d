"""The scoring pass: per-sample gradients of every block, reduced to per-block Gram statistics.

One forward and one backward per chunk of samples (the backward differentiates the sum of the
per-sample losses), tensor hooks on each MoE-LoRA layer's activations turn the output gradients into
per-sample gradients (see persample.py), and only per-sample gradient rows of the scored blocks, exact
or sketched to k coordinates, are kept until the Grams are formed.

Memory: exact rows cost (n + m) * d_l numbers per block. The store (`max_store_bytes`, by default a
fraction of the memory available on the device) bounds them; `plan.py` decides from the shapes alone
whether the rows stay exact or the widest blocks are CountSketched so that one pass suffices
(`projection_dim="auto"`, the default), or, with `projection_dim=None`, splits the blocks into
several exact passes. A sketched block keeps its exact mean validation gradient when the plan says so
(`BlockPlan.exact_mean`): the validation chunks run first, their exact rows are summed, and each
training row's exact product with the mean is taken before the row is sketched (see
`statistics.statistics_with_exact_mean`: the gbar direction is kept exactly, the rest is sketched).
The backward never forms parameter gradients: it
differentiates with respect to a detached copy of the input embeddings, so parameters' `.grad` and
`requires_grad` are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from layermoe.adapters.probe import probe_empty_layers
from layermoe.layout import is_int_at_least
from layermoe.progress import progress_bar

from .batches import batch_size, map_tensors, slice_batch
from .distributed import ReduceFn, gather_rows
from .errors import ScoringError
from .losses import causal_lm_per_sample_loss
from .modules import scored_layers
from .persample import (
    adapter_pieces_from_hidden,
    adapter_pieces_from_logits,
    adapter_pieces_from_output,
    base_piece_from_output,
    piece_dtype,
    piece_names,
    piece_numel,
)
from .plan import (
    DEFAULT_STORE_FRACTION,
    CapturePlan,
    default_store_bytes,
    plan_capture,
    projection_error_bound,
)
from .projection import CountSketch
from .statistics import BlockStatistics, gram, statistics_from_pieces, statistics_with_exact_mean

logger = logging.getLogger("layermoe.scoring")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
LossSink = Callable[[str, torch.Tensor], None]
Batch = Any  # any structure the loss accepts (batches.py)
SCOPES = ("adapter", "base")


class _Collector:
    """Receives per-sample gradient pieces from the hooks and keeps rows per block (exact or sketched)."""

    def __init__(
        self,
        layers: dict[int, dict[str, nn.Module]],
        scope: str,
        seed: int,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        self.layers = layers
        self.scope = scope
        self.seed = seed
        self.reduce_fn = reduce_fn
        self.k: dict[int, int | None] = dict.fromkeys(layers)
        # Blocks whose exact mean validation gradient is kept while their rows are sketched: per piece,
        # the sum of the validation rows (then, after the validation chunks, their mean), and per
        # training chunk the exact products of its rows with that mean.
        self.exact_mean: set[int] = set()
        self.val_sum: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.val_mean: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.val_count = 0
        self.chunk_dots: dict[int, torch.Tensor] = {}
        self.mean_dots: dict[int, list[torch.Tensor]] = {}
        self.split = "train"
        self.keys: dict[int, list[tuple[str, str]]] = {}
        self.numel: dict[tuple[int, str, str], int] = {}
        self.dtype: dict[tuple[int, str, str], torch.dtype] = {}
        self.sketch: dict[tuple[int, str, str], CountSketch] = {}
        self.dims: dict[int, int] = {}
        for block, modules in layers.items():
            keys = []
            for name in sorted(modules):
                for piece in piece_names(modules[name], scope):
                    key = (block, name, piece)
                    keys.append((name, piece))
                    self.numel[key] = piece_numel(modules[name], piece)
                    self.dtype[key] = piece_dtype(modules[name], piece)
            self.keys[block] = keys
            self.dims[block] = sum(self.numel[(block, n, p)] for n, p in keys)
        self.device = next(iter(next(iter(layers.values())).values())).lora_shape.device
        self.store: dict[str, dict[int, dict[tuple[str, str], list[torch.Tensor]]]] = {"train": {}, "val": {}}
        self.chunk: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.batch_size = 0
        self.graph_tensors: list[torch.Tensor] = []
        self.no_graph: str | None = None
        self.active: list[int] = list(self.keys)

    def block_dtype(self, block: int) -> torch.dtype:
        dtype = torch.float32
        for name, piece in self.keys[block]:
            dtype = torch.promote_types(dtype, self.dtype[(block, name, piece)])
        return dtype

    def element_bytes(self, block: int) -> int:
        return torch.empty((), dtype=self.block_dtype(block)).element_size()

    def project(self, widths: Mapping[int, int | None], exact_means: Iterable[int] = ()) -> None:
        """Sketch block b's rows to widths[b] coordinates (None: keep them exact); the sketched blocks in
        `exact_means` also keep their exact mean validation gradient."""
        self.exact_mean = {b for b in exact_means if widths.get(b) is not None}
        for block, k in widths.items():
            self.k[block] = k
            for name, piece in self.keys[block]:
                key = (block, name, piece)
                self.sketch.pop(key, None)
                if k is not None:
                    self.sketch[key] = CountSketch(self.numel[key], k, self.seed, f"{block}/{name}/{piece}")

    # ------------------------------------------------------------------ hooks
    def add(self, block: int, name: str, pieces: list[tuple[str, torch.Tensor]]) -> None:
        for piece, grad in pieces:
            rows = grad.reshape(grad.shape[0], -1)
            if self.k[block] is not None:
                rows = rows.to(self.block_dtype(block))
                if block in self.exact_mean:
                    self.exact_mean_products(block, (name, piece), rows)
                rows = self.sketch[(block, name, piece)](rows)
                slot = ("", "sketch")
            else:
                slot = (name, piece)
            held = self.chunk.setdefault(block, {})
            # A module called twice in one forward (shared weights) contributes the sum of both calls.
            held[slot] = rows if slot not in held else held[slot] + rows

    def exact_mean_products(self, block: int, key: tuple[str, str], rows: torch.Tensor) -> None:
        """Before a piece's rows are sketched: add validation rows to the exact sum, or take training
        rows' exact products with the (complete) mean. Both are linear, so a module called twice in one
        forward contributes the sum of its calls, as for the rows themselves."""
        if self.split == "val":
            total = self.val_sum[block]
            total[key] = total[key] + rows.sum(dim=0)
            return
        mean = self.val_mean[block].get(key)
        if mean is None:
            return
        dots = gram(rows, mean.unsqueeze(0)).squeeze(1)
        held = self.chunk_dots
        held[block] = dots if block not in held else held[block] + dots

    def hook_for(self, block: int, name: str) -> Callable[[nn.Module, dict[str, Any]], None]:
        def capture(layer: nn.Module, tensors: dict[str, Any]) -> None:
            saved = {
                key: (t.detach() if t is not None else None) for key, t in tensors.items() if key != "output"
            }
            output = tensors["output"]
            if not output.requires_grad:
                self.no_graph = name
                return
            if self.scope == "base":
                output.register_hook(lambda g: self.add(block, name, base_piece_from_output(layer, saved, g)))
                self.graph_tensors.append(output)
                return
            hidden, logits = tensors["expert_hidden"], tensors["router_logits"]
            output.register_hook(lambda g: self.add(block, name, adapter_pieces_from_output(layer, saved, g)))
            hidden.register_hook(lambda g: self.add(block, name, adapter_pieces_from_hidden(saved, g)))
            self.graph_tensors += [output, hidden]
            if logits is not None:
                logits.register_hook(
                    lambda g: self.add(block, name, adapter_pieces_from_logits(layer, saved, g))
                )
                self.graph_tensors.append(logits)

        return capture

    # ------------------------------------------------------------------ chunks
    def start(self, group: list[int]) -> None:
        """Begin a pass over the blocks in `group`: zero exact-mean sums (every piece, so every rank
        gathers the same tensors even where a piece got no gradient)."""
        self.active = group
        self.val_count = 0
        self.val_mean, self.mean_dots = {}, {}
        self.val_sum = {
            block: {
                key: torch.zeros(self.numel[(block, *key)], dtype=self.block_dtype(block), device=self.device)
                for key in self.keys[block]
            }
            for block in group
            if block in self.exact_mean
        }

    def begin(self, batch_size: int, split: str = "train") -> None:
        self.chunk = {}
        self.chunk_dots = {}
        self.graph_tensors = []
        self.batch_size = batch_size
        self.split = split

    def end_split(self, split: str) -> None:
        """After the validation chunks: the exact mean validation gradient of every exact-mean block,
        summed over ranks (an all-gather of one row per piece), so training rows can be dotted with it."""
        if split != "val" or not self.val_sum:
            return
        count = torch.tensor([[self.val_count]], dtype=torch.int64, device=self.device)
        total = int(gather_rows(count, self.reduce_fn).sum())
        for block in sorted(self.val_sum):
            sums = self.val_sum.pop(block)
            self.val_mean[block] = {
                key: gather_rows(sums[key].unsqueeze(0), self.reduce_fn).sum(dim=0) / total
                for key in sorted(sums)
            }

    def flush(self, split: str) -> None:
        """Move the chunk's rows to the store; a piece that got no gradient (unused) is zero."""
        store = self.store[split]
        if split == "val":
            self.val_count += self.batch_size
        for block in self.active:
            if block in self.exact_mean and split == "train":
                dots = self.chunk_dots.get(block)
                if dots is None:
                    dots = torch.zeros(self.batch_size, dtype=torch.float64, device=self.device)
                self.mean_dots.setdefault(block, []).append(dots)
            keys = self.keys[block]
            held = self.chunk.get(block, {})
            k = self.k[block]
            slots = [("", "sketch")] if k is not None else keys
            for slot in slots:
                rows = held.get(slot)
                if rows is None:
                    width = k if k is not None else self.numel[(block, *slot)]
                    dtype = self.block_dtype(block) if k is not None else self.dtype[(block, *slot)]
                    rows = torch.zeros(self.batch_size, width, dtype=dtype, device=self.device)
                store.setdefault(block, {}).setdefault(slot, []).append(rows)
        self.chunk = {}
        self.chunk_dots = {}
        self.graph_tensors = []

    def statistics(self) -> dict[int, BlockStatistics]:
        out: dict[int, BlockStatistics] = {}
        reduce_fn = self.reduce_fn
        for block in self.active:
            train_slots = self.store["train"].pop(block)
            val_slots = self.store["val"].pop(block)
            train = [gather_rows(torch.cat(train_slots[s]), reduce_fn) for s in sorted(train_slots)]
            val = [gather_rows(torch.cat(val_slots[s]), reduce_fn) for s in sorted(val_slots)]
            if block in self.exact_mean:
                # the training rows' products with the mean, gathered in the same rank order as the rows
                k_gt = gather_rows(torch.cat(self.mean_dots.pop(block)).unsqueeze(1), reduce_fn).squeeze(1)
                mean_sq = torch.zeros((), dtype=torch.float64, device=k_gt.device)
                for mean in self.val_mean.pop(block).values():
                    mean_sq += gram(mean.unsqueeze(0)).squeeze()
                (train_rows,), (val_rows,) = train, val  # a sketched block has one slot
                stats = statistics_with_exact_mean(
                    train_rows, val_rows, k_gt, mean_sq, self.dims[block], self.k[block]
                )
            else:
                stats = statistics_from_pieces(train, val, self.dims[block], self.k[block])
            stats.check_finite(block)
            out[block] = stats
        return out


def _chunks(batches: Iterable[Batch], chunk_size: int, device: torch.device, field: str) -> list[Any]:
    """Split every batch into sub-batches of at most chunk_size samples, moved to the model's device.

    Any batch structure works (see batches.py); inference tensors (batches built under
    torch.inference_mode) are cloned into normal tensors so autograd may save them.
    """

    def to_device(value: torch.Tensor) -> torch.Tensor:
        value = value.to(device)
        return value.clone() if value.is_inference() else value

    out: list[Any] = []
    for batch in batches:
        try:
            size = batch_size(batch)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
        for start in range(0, size, chunk_size):
            part = slice_batch(batch, start, start + chunk_size, size) if size > chunk_size else batch
            out.append(map_tensors(part, to_device))
    if not out:
        raise ValueError(f"{field} is empty: scoring needs at least one sample")
    return out


def _progress(total: int, enabled: bool | None) -> Any:
    # None: a bar on a terminal, elsewhere a line every 20 s once the pass has run that long
    return progress_bar(total=total, desc="scoring", unit="chunk", disable=enabled is False, leave=False)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The input embedding layer of the (first) Hugging Face model inside `model`, e.g. a
    LightningModule holding it as an attribute; None when there is none (then the backward targets
    the hooked activations themselves, which keeps their gradients alive until the chunk ends)."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter):
            try:
                embeddings = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(embeddings, nn.Module):
                return embeddings
    return None


@contextmanager
def _scoring_mode(
    model: nn.Module, all_layers: list[tuple[int, str, nn.Module]]
) -> Iterator[list[torch.Tensor]]:
    """Eval mode, grad enabled even under inference_mode, an anchor on the input embeddings; undone on
    exit (train/eval flags of every module, every layer's capture_hook, the embedding hook)."""
    previous_hooks = [(layer, layer.capture_hook) for _, _, layer in all_layers]
    modes = [(module, module.training) for module in model.modules()]
    anchors: list[torch.Tensor] = []
    handle = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            embeddings = _input_embeddings(model)
            if embeddings is not None:

                def anchor(_module: nn.Module, _inputs: Any, output: Any) -> Any:
                    # Differentiate w.r.t. a detached copy of the embeddings: the backward reaches every
                    # block without forming (or touching) any parameter gradient.
                    if isinstance(output, torch.Tensor) and output.is_floating_point():
                        output = output.detach().requires_grad_(True)
                        anchors.append(output)
                    return output

                handle = embeddings.register_forward_hook(anchor)
            yield anchors
    finally:
        if handle is not None:
            handle.remove()
        for layer, hook in previous_hooks:
            layer.capture_hook = hook
        for module, mode in modes:
            module.training = mode


def _check_options(scope: str, chunk_size: int, projection_dim: int | str | None) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not is_int_at_least(chunk_size):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if projection_dim not in (None, "auto") and not is_int_at_least(projection_dim):
        raise ValueError(
            f"projection_dim must be 'auto', None (exact) or an int >= 1, got {projection_dim!r}"
        )


def _run_passes(
    model: nn.Module,
    collector: _Collector,
    splits: list[tuple[str, list[Any]]],
    loss_fn: LossFn,
    groups: list[list[int]],
    progress: bool | None,
    on_group_done: Callable[[list[int]], None],
    loss_sink: LossSink | None = None,
) -> None:
    all_layers = [(b, n, layer) for b, mods in collector.layers.items() for n, layer in mods.items()]
    total = len(groups) * sum(len(chunks) for _, chunks in splits)
    with _scoring_mode(model, all_layers) as anchors, _progress(total, progress) as bar:
        for index, group in enumerate(groups):
            collector.start(group)
            for block, name, layer in all_layers:
                layer.capture_hook = collector.hook_for(block, name) if block in group else None
            for split, chunks in splits:
                for chunk in chunks:
                    losses = _backward_chunk(model, chunk, loss_fn, collector, anchors, split)
                    if loss_sink is not None and index == 0:
                        loss_sink(split, losses)
                    bar.update(1)
                collector.end_split(split)
            on_group_done(group)


def capture_statistics(
    model: nn.Module,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    loss_fn: LossFn = causal_lm_per_sample_loss,
    scope: str = "adapter",
    *,
    modules: Sequence[str] | None = None,
    blocks: Sequence[int] | None = None,
    chunk_size: int = 8,
    projection_dim: int | str | None = "auto",
    projection_seed: int = 0,
    reduce_fn: ReduceFn | None = None,
    max_store_bytes: int | None = None,
    store_fraction: float = DEFAULT_STORE_FRACTION,
    progress: bool | None = None,
    show_plan: bool | None = None,
    loss_sink: LossSink | None = None,
) -> dict[int, BlockStatistics]:
    """Per-block gradient statistics of the n training and m validation samples.

    loss_fn(model, batch) -> (B,) per-sample losses (mean over each sample's own tokens; padding must
    not count). scope: "adapter" scores the block's MoE-LoRA parameters (A, B, router weight and bias),
    "base" the frozen base weights of the wrapped modules. modules: substrings selecting modules (e.g.
    ["self_attn"]). blocks: score only these block indices (default all). chunk_size: samples per
    forward/backward. projection_dim: "auto" keeps exact rows when every block's rows fit the store and
    otherwise CountSketches the widest blocks in the same single pass (see layermoe.scoring.plan); an
    int k sketches every block to k coordinates; None keeps exact rows and splits the blocks into
    several passes when they do not fit. projection_seed: the sketch's seed (identical on every rank).
    reduce_fn: an all-gather for DDP (see layermoe.scoring.distributed); each rank passes its shard of
    samples and every rank gets identical statistics. max_store_bytes: bound on the kept gradient rows;
    None takes `store_fraction` of the memory available on the model's device (the smallest over ranks).
    progress: None shows a bar on a terminal and, elsewhere, a line every 20 s
    once the pass has taken that long; False shows nothing. show_plan: print the memory plan to stderr before
    the first pass (None: only on a terminal); it is also logged at INFO on "layermoe.scoring".
    loss_sink(split, losses): receives each chunk's detached per-sample losses ("train" / "val") from
    the first pass, so a caller can reuse the scoring forward's losses instead of another forward.

    Runs in eval mode under torch.inference_mode(False) + enable_grad (so it works from validation
    hooks), and restores every module's train/eval mode and every layer's capture_hook afterwards;
    parameters' requires_grad and .grad are never touched. With scope "adapter", a block with 0
    experts is scored as if one fresh expert had been added (`layermoe.adapters.probe`).
    """
    _check_options(scope, chunk_size, projection_dim)
    # blocks with 0 experts are scored through a temporary fresh adapter (layermoe.adapters.probe)
    with _probed(model, scope):
        return _capture_statistics(
            model,
            train_batches,
            val_batches,
            loss_fn,
            scope,
            modules=modules,
            blocks=blocks,
            chunk_size=chunk_size,
            projection_dim=projection_dim,
            projection_seed=projection_seed,
            reduce_fn=reduce_fn,
            max_store_bytes=max_store_bytes,
            store_fraction=store_fraction,
            progress=progress,
            show_plan=show_plan,
            loss_sink=loss_sink,
        )


def _probed(model: nn.Module, scope: str) -> contextlib.AbstractContextManager[Any]:
    """With scope "adapter", gives each 0-expert layer a function-preserving probe expert meanwhile."""
    return probe_empty_layers(model) if scope == "adapter" else contextlib.nullcontext()


def _capture_statistics(
    model: nn.Module,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch],
    loss_fn: LossFn,
    scope: str,
    *,
    modules: Sequence[str] | None,
    blocks: Sequence[int] | None,
    chunk_size: int,
    projection_dim: int | str | None,
    projection_seed: int,
    reduce_fn: ReduceFn | None,
    max_store_bytes: int | None,
    store_fraction: float,
    progress: bool | None,
    show_plan: bool | None,
    loss_sink: LossSink | None,
) -> dict[int, BlockStatistics]:
    collector = _Collector(scored_layers(model, modules, blocks), scope, projection_seed, reduce_fn)
    results: dict[int, BlockStatistics] = {}
    with torch.inference_mode(False):
        train_chunks = _chunks(train_batches, chunk_size, collector.device, "train_batches")
        val_chunks = _chunks(val_batches, chunk_size, collector.device, "val_batches")
    samples = sum(batch_size(c) for c in train_chunks) + sum(batch_size(c) for c in val_chunks)
    store, source = _store_budget(collector.device, max_store_bytes, store_fraction)
    if reduce_fn is not None:
        # Every rank must make the same plan (each pass gathers once per piece): all samples, least memory.
        info = torch.tensor([samples, store], dtype=torch.int64, device=collector.device)
        gathered = [g.reshape(-1, 2) for g in reduce_fn(info.reshape(1, 2))]
        samples = sum(int(g[:, 0].sum()) for g in gathered)
        store = min(int(g[:, 1].min()) for g in gathered)
    plan = _plan(collector, samples, store, source, projection_dim)
    _announce(plan, show_plan)
    collector.project(
        {b.block: b.projection_dim for b in plan.blocks}, [b.block for b in plan.blocks if b.exact_mean]
    )
    _run_passes(
        model,
        collector,
        # validation first: an exact mean validation gradient must be complete before training rows
        [("val", val_chunks), ("train", train_chunks)],
        loss_fn,
        [list(group) for group in plan.passes],
        progress,
        lambda _group: results.update(collector.statistics()),
        loss_sink,
    )
    bounds = {b: projection_error_bound(s) for b, s in results.items() if s.projected_dim is not None}
    if bounds:
        worst = max(bounds, key=lambda b: bounds[b])
        logger.info(
            "scoring: sketch error bound (relative to the sketched products the scores use) %s; worst block %d: %.3g",
            ", ".join(f"{b}:{v:.3g}" for b, v in sorted(bounds.items())),
            worst,
            bounds[worst],
        )
    return dict(sorted(results.items()))


def _store_budget(device: torch.device, max_store_bytes: int | None, fraction: float) -> tuple[int, str]:
    if max_store_bytes is None:
        return default_store_bytes(device, fraction)
    if not is_int_at_least(max_store_bytes):
        raise ValueError(f"max_store_bytes must be None (automatic) or an int >= 1, got {max_store_bytes!r}")
    return int(max_store_bytes), "max_store_bytes"


def _plan(
    collector: _Collector, samples: int, store: int, source: str, projection_dim: int | str | None
) -> CapturePlan:
    """The plan for the collector's blocks: one function for capture_statistics and capture_plan, so the
    plan capture_plan reports is the one capture_statistics makes."""
    return plan_capture(
        collector.dims,
        samples,
        store,
        projection_dim,
        element_bytes={b: collector.element_bytes(b) for b in collector.dims},
        store_source=source,
    )


def _announce(plan: CapturePlan, show: bool | None) -> None:
    text = plan.describe()
    logger.info("%s", text)
    if sys.stderr.isatty() if show is None else show:
        print(text, file=sys.stderr, flush=True)


def capture_plan(
    model: nn.Module,
    samples: int,
    scope: str = "adapter",
    *,
    modules: Sequence[str] | None = None,
    blocks: Sequence[int] | None = None,
    projection_dim: int | str | None = "auto",
    max_store_bytes: int | None = None,
    store_fraction: float = DEFAULT_STORE_FRACTION,
) -> CapturePlan:
    """The plan capture_statistics would make for `samples` (n + m) samples on this model, without
    running anything (the same shapes, dtypes and store rule; 0-expert blocks with the probe expert
    scoring gives them)."""
    _check_options(scope, 1, projection_dim)
    with _probed(model, scope):
        collector = _Collector(scored_layers(model, modules, blocks), scope, 0)
    store, source = _store_budget(collector.device, max_store_bytes, store_fraction)
    return _plan(collector, samples, store, source, projection_dim)


def capture_per_sample_gradients(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn = causal_lm_per_sample_loss,
    scope: str = "adapter",
    *,
    modules: Sequence[str] | None = None,
    blocks: Sequence[int] | None = None,
    chunk_size: int = 8,
) -> dict[int, dict[str, torch.Tensor]]:
    """Explicit per-sample gradients {block: {"module.param": (n, *param_shape)}} from the same hooks.

    For references, tests and the LayerIF-loop baseline: it materializes every per-sample gradient of
    every block, which is what capture_statistics avoids; keep n and the model small. With scope
    "adapter", blocks with 0 experts (no adapter parameters) are left out.
    """
    _check_options(scope, chunk_size, None)
    layers = scored_layers(model, modules, blocks)
    if scope == "adapter":  # a block with 0 experts has no adapter parameter to differentiate
        layers = {b: {n: m for n, m in mods.items() if m.has_adapter} for b, mods in layers.items()}
        layers = {b: mods for b, mods in layers.items() if mods}
    collector = _Collector(layers, scope, 0)
    with torch.inference_mode(False):
        chunks = _chunks(batches, chunk_size, collector.device, "batches")
    _run_passes(
        model, collector, [("train", chunks)], loss_fn, [list(collector.keys)], False, lambda _g: None
    )
    out: dict[int, dict[str, torch.Tensor]] = {}
    for block, slots in collector.store["train"].items():
        out[block] = {}
        for (name, piece), rows in sorted(slots.items()):
            stacked = torch.cat(rows)
            layer = layers[block][name]
            if piece == "base_layer.weight":
                shape = (
                    tuple(layer.base_layer.weight.shape)
                    if not layer.info.quantized
                    else (
                        layer.info.out_features,
                        layer.info.in_features,
                    )
                )
            else:
                shape = tuple(getattr(layer, piece).shape)
            out[block][f"{name}.{piece}"] = stacked.view(stacked.shape[0], *shape)
    return out


def _backward_chunk(
    model: nn.Module,
    chunk: Any,
    loss_fn: LossFn,
    collector: _Collector,
    anchors: list[torch.Tensor],
    split: str,
) -> torch.Tensor:
    size = batch_size(chunk)
    collector.begin(size, split)
    anchors.clear()
    losses = loss_fn(model, chunk)
    if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
        raise ValueError(
            f"loss_fn must return per-sample losses of shape ({size},), got "
            f"{getattr(losses, 'shape', type(losses).__name__)}; reduce over tokens only, not over samples"
        )
    if not bool(torch.isfinite(losses).all()):
        raise ScoringError(f"loss_fn returned NaN/inf on a {split} chunk; check those samples and the model")
    if collector.no_graph is not None:
        raise ScoringError(
            f"module {collector.no_graph}: its output does not require grad, so no gradient can be captured; "
            "the model's input embeddings must feed the blocks (or the adapter parameters must require grad)"
        )
    targets = [a for a in anchors if a.requires_grad] or collector.graph_tensors
    if not targets or not losses.requires_grad:
        raise ScoringError("the loss does not depend on any scored layer; check loss_fn and modules=...")
    torch.autograd.grad(losses.sum(), targets, allow_unused=True)
    collector.flush(split)
    anchors.clear()
    return losses.detach()
