"""Issue 23: configuration mistakes in train.py configs fail before training with the short message:
an unknown scorer or allocator name (not buried in jsonargparse's union error), and a dict model whose
vocabulary is smaller than the tiny tokenizer's (not an IndexError at the first step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from layermoe.callbacks import CallbackConfigError
from layermoe.cli import main
from tests.test_cli_quickstart import QUICKSTART, _override


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    return tmp_path


def _with_influence(path: Path, **init_args: object) -> Path:
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "layermoe.callbacks.LayerInfluenceCallback", "init_args": init_args}
    ]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("init_args", "pattern"),
    [
        (
            {"scorer": "layerifff"},
            r"^trainer.callbacks\[0\] \(LayerInfluenceCallback\): scorer='layerifff'.*registered",
        ),
        (
            {"allocator": "greedy"},
            r"^trainer.callbacks\[0\] \(LayerInfluenceCallback\): allocator='greedy'.*power_law",
        ),
    ],
)
def test_unknown_registry_names_fail_with_the_short_message(
    run_dir, tiny_spec, toy_files, init_args, pattern
):
    override = _with_influence(_override(run_dir, tiny_spec, toy_files), **init_args)
    with pytest.raises(CallbackConfigError, match=pattern) as info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    assert "Union" not in str(info.value) and len(str(info.value).splitlines()) == 1


def test_dict_model_smaller_than_the_tiny_vocabulary_fails_at_setup(run_dir, tiny_spec, toy_files):
    spec = {**tiny_spec, "vocab_size": 100}
    override = _override(run_dir, spec, toy_files)
    with pytest.raises(
        ValueError, match=r"tokenizer has 261 tokens but .* only 100 rows; set model.model.vocab_size >= 261"
    ):
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    assert not (run_dir / "runs" / "quickstart" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("folder", r"is a folder, not a checkpoint file\. It holds last\.ckpt"),
        ("state_dict", "bare state_dict"),
    ],
)
def test_ckpt_path_that_is_not_a_checkpoint_fails_before_the_model_is_built(
    run_dir, tiny_spec, toy_files, kind, pattern
):
    from layermoe.checkpointing.integrity import NotACheckpointError
    from tests.test_checkpoint_load_errors import _not_a_checkpoint

    path = _not_a_checkpoint(run_dir, kind)
    override = _override(run_dir, tiny_spec, toy_files)
    with pytest.raises(NotACheckpointError, match=pattern):
        main(["fit", "--config", str(QUICKSTART), "--config", str(override), "--ckpt_path", str(path)])


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        (
            {"vocab_size": "x"},
            r"refused its field 'vocab_size': .*expected int.* Fix model\.model\.vocab_size\.",
        ),
        (
            {"hidden_size": 30},
            r"not a valid transformers llama config: .*hidden size \(30\) is not a multiple",
        ),
        ({"hidden_act": "nope"}, r"a value it does not know \('nope'\).* Fix model\.model\.hidden_act\."),
    ],
)
def test_bad_model_dict_names_the_config_field(run_dir, tiny_spec, toy_files, field, pattern):
    override = _override(run_dir, {**tiny_spec, **field}, toy_files)
    with pytest.raises(ValueError, match=pattern):
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])


def test_partial_adapter_override_merges_into_the_configured_adapter(run_dir, tiny_spec, toy_files):
    from layermoe.cli import LayerMoECLI

    override = _override(run_dir, tiny_spec, toy_files)
    configured = yaml.safe_load(QUICKSTART.read_text())["model"]["adapter"]
    for option in (["--model.adapter", "{experts: 3, rank: 2}"], ["--model.adapter={experts: 3, rank: 2}"]):
        cli = LayerMoECLI(args=["--config", str(QUICKSTART), "--config", str(override), *option], run=False)
        adapter = cli.model.hparams.adapter
        assert (adapter["experts"], adapter["rank"]) == (3, 2)
        # the fields the override left out keep the configured values, not MoELoRAConfig's defaults
        for field in ("lora_alpha", "lora_dropout", "target_modules", "router_aux_loss_coef"):
            assert adapter[field] == configured[field], field


def test_resume_with_another_layout_lists_only_the_layout_fields(run_dir, tiny_spec, toy_files):
    from layermoe.lightning_modules.resume_settings import CheckpointSettingsError

    override = _override(run_dir, tiny_spec, toy_files, max_steps=3)
    main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    last = run_dir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointSettingsError) as info:
        main(
            ["fit", "--config", str(QUICKSTART), "--config", str(override), "--ckpt_path", str(last)]
            + ["--model.adapter", "{experts: 3, rank: 2}", "--trainer.max_steps", "6"]
        )
    listed = [line.strip().split(":")[0] for line in str(info.value).splitlines() if line.startswith("  ")]
    assert listed == ["model.adapter.experts", "model.adapter.rank"]


def test_val_size_from_the_cli_keeps_ints_as_row_counts(run_dir, tiny_spec, toy_files):
    from layermoe.cli import LayerMoECLI

    override = _override(run_dir, tiny_spec, toy_files)
    for given, expected in (("1", 1), ("200", 200), ("0.25", 0.25)):
        args = ["--config", str(QUICKSTART), "--config", str(override), "--data.val_size", given]
        value = LayerMoECLI(args=args, run=False).datamodule.val_size
        assert value == expected and type(value) is type(expected), given


def test_a_failure_building_a_valid_config_is_not_called_a_bad_config(tiny_spec, monkeypatch):
    from transformers import AutoModelForCausalLM

    from layermoe.lightning_modules.model_factory import build_tiny_model

    def from_config(*args, **kwargs):
        raise ValueError("allocator exploded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    with pytest.raises(ValueError, match=r"^allocator exploded$"):
        build_tiny_model(tiny_spec)


def _with_model_settings(path: Path, **settings: object) -> Path:
    config = yaml.safe_load(path.read_text())
    config["model"].update(settings)
    path.write_text(yaml.safe_dump(config))
    return path


def _config_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """The last stderr line of a train.py run that must stop as jsonargparse stops on a bad option: exit
    status 2, no traceback, nothing written."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert not Path("runs").exists()
    return err.strip().splitlines()[-1]


ADAPTER_FIELDS = (
    "experts, extra, lora_alpha, lora_dropout, modules_to_save, rank, router_aux_loss_coef, router_init_std,"
    " router_z_loss_coef, routing_mass_decay, target_modules, top_k"
)


def test_a_misspelled_adapter_field_is_one_message_naming_the_field(run_dir, tiny_spec, toy_files, capsys):
    override = _with_model_settings(
        _override(run_dir, tiny_spec, toy_files), adapter={"experts": 3, "rnak": 2}
    )
    last = _config_error(capsys, ["fit", "--config", str(QUICKSTART), "--config", str(override)])
    assert last == (
        "error: model.adapter.rnak (did you mean model.adapter.rank?) is not a known field of model.adapter;"
        f" known fields: {ADAPTER_FIELDS}."
    )
    # the same from the command line's partial override, and with nothing close to suggest
    plain = _override(run_dir, tiny_spec, toy_files)
    last = _config_error(
        capsys,
        ["fit", "--config", str(QUICKSTART), "--config", str(plain), "--model.adapter", "{rnak: 2, zzz: 1}"],
    )
    assert last.startswith(
        "error: model.adapter.rnak (did you mean model.adapter.rank?) and model.adapter.zzz are not known"
        " fields of model.adapter; known fields: experts,"
    )


@pytest.mark.parametrize(
    ("option", "expected"),
    [("3", "error: --model.adapter takes a dict of adapter fields"), ("{rank: 2", "is not valid YAML")],
)
def test_an_adapter_override_that_is_not_a_dict_is_one_message(
    run_dir, tiny_spec, toy_files, capsys, option, expected
):
    override = _override(run_dir, tiny_spec, toy_files)
    last = _config_error(
        capsys, ["fit", "--config", str(QUICKSTART), "--config", str(override), "--model.adapter", option]
    )
    assert expected in last


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        ({"rank": 0}, "error: model.adapter: MoELoRAConfig.rank"),
        ("oops", 'error: Parser key "model.adapter":'),  # jsonargparse's own type error, no traceback either
    ],
)
def test_a_bad_adapter_value_or_type_is_one_message(run_dir, tiny_spec, toy_files, capsys, adapter, expected):
    override = _with_model_settings(_override(run_dir, tiny_spec, toy_files), adapter=adapter)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and expected in err
    assert not Path("runs").exists()


def test_a_misspelled_model_dict_field_is_one_message_not_a_silent_default(
    run_dir, tiny_spec, toy_files, capsys
):
    from layermoe.lightning_modules.model_factory import build_tiny_model

    override = _override(run_dir, {**tiny_spec, "hiden_size": 64}, toy_files)
    last = _config_error(capsys, ["fit", "--config", str(QUICKSTART), "--config", str(override)])
    assert last.startswith(
        "error: model.model.hiden_size (did you mean model.model.hidden_size?) is not a known field of"
        " model.model; known fields: "
    )
    assert " type," in last and " vocab_size." in last
    # the Python API refuses it too, instead of building the default hidden size
    with pytest.raises(
        ValueError, match=r"^model\.model\.hiden_size \(did you mean model\.model\.hidden_size\?\)"
    ):
        build_tiny_model({**tiny_spec, "hiden_size": 64})
    # keywords transformers converts (legacy rope_theta) or maps (GPT-2's hidden_size) are not refused
    llama = build_tiny_model({**tiny_spec, "rope_theta": 5000.0})
    assert llama.config.rope_parameters["rope_theta"] == 5000.0
    gpt2 = {"type": "gpt2", "vocab_size": 320, "hidden_size": 32, "n_layer": 1, "n_head": 2}
    assert build_tiny_model(gpt2).config.n_embd == 32


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"quantization": "4bits"},
            "error: model.quantization='4bits' (did you mean '4bit'?): must be one of '4bit', '8bit' or null.",
        ),
        ({"dtype": "fp32"}, "error: model.dtype='fp32': must be one of 'bfloat16', 'float16', 'float32'."),
        ({"model": "smollm3"}, "error: model.model='smollm3' (did you mean 'smollm2'?): model folder"),
        ({"model": "no/such/folder"}, "error: model.model='no/such/folder': model folder"),
    ],
)
def test_a_bad_model_setting_value_is_one_message_naming_it(
    run_dir, tiny_spec, toy_files, capsys, settings, expected
):
    """Before: each of these built nothing and stopped in a traceback from inside the module's __init__."""
    override = _with_model_settings(_override(run_dir, tiny_spec, toy_files), **settings)
    last = _config_error(capsys, ["fit", "--config", str(QUICKSTART), "--config", str(override)])
    assert last.startswith(expected)
    if "model" in settings:
        assert last.endswith("Known names: 'smollm2', or a model folder path.")


@pytest.mark.parametrize("precision", ["bf17", "fp32"])
def test_a_bad_precision_is_one_message_before_the_model_is_built(
    run_dir, tiny_spec, toy_files, capsys, monkeypatch, precision
):
    """Before: Lightning's ValueError came from Trainer.__init__, after the model loaded, in a traceback."""
    import layermoe.lightning_modules.finetuner as finetuner

    built: list[str] = []
    monkeypatch.setattr(finetuner, "build_model", lambda *a, **k: built.append("model"))
    override = _override(run_dir, tiny_spec, toy_files)
    last = _config_error(
        capsys,
        ["fit", "--config", str(QUICKSTART), "--config", str(override), "--trainer.precision", precision],
    )
    assert last.startswith(f"error: trainer.precision: {precision!r} is not a precision; use auto")
    assert "bf16-mixed" in last and "32-true" in last and not built
