"""The engine's GPU-oriented options, exercised on the CPU through the same code path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import kdcli_run

from kdcli.engine.checkpoint import load_checkpoint
from kdcli.engine.device import amp_dtype, select_device
from kdcli.engine.loop import warmup_cosine
from kdcli.errors import UsageError
from kdcli.train import resolve_config, teach


def quick(shards, out, **extra):
    return resolve_config({"data": str(shards), "modality": "fundus", "model": "test_resnet", "head": "linear",
                           "epochs": 1, "batch_size": 8, "workers": 0, "out": str(out), **extra})


def test_accumulation_ema_clipping_bf16_and_channels_last_run_together(multieye_shards, tmp_path):
    cfg = quick(multieye_shards, tmp_path / "m.pt", accumulate=2, ema=0.5, grad_clip=1.0, amp="bf16",
                channels_last="on", batch_size=4)
    result = teach(cfg, log=lambda m: None)
    assert result.epochs_run == 1
    last = load_checkpoint(tmp_path / "m.last.pt")
    batches = 27 // 4  # fundus train rows at per_class 5 (3 per class), drop_last
    assert last.state["scheduler"]["last_epoch"] == batches // 2  # one optimizer step per two batches
    raw = {k.removeprefix("student."): v for k, v in last.state["method"].items()}
    ema_weights = last.model  # what `best`/`last` store is the EMA model, the one that was validated
    conv = next(k for k in ema_weights if k.endswith("conv1.weight"))
    assert not torch.equal(raw[conv], ema_weights[conv])
    row = json.loads((tmp_path / "m.metrics.jsonl").read_text().splitlines()[0])
    assert row["train_loss"] == pytest.approx(row["train_ce"]) and row["train_loss"] > 0


def test_fp16_on_cpu_uses_a_grad_scaler_path(multieye_shards, tmp_path):
    teach(quick(multieye_shards, tmp_path / "h.pt", amp="fp16"), log=lambda m: None)
    assert load_checkpoint(tmp_path / "h.pt").meta["config"]["amp"] == "fp16"


def test_device_and_precision_selection():
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    assert amp_dtype(torch.device("cpu"), "auto") is None  # CPU trains in fp32 unless asked
    assert amp_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(UsageError, match="cpu"):
        select_device("cuda:7") if not torch.cuda.is_available() else (_ for _ in ()).throw(UsageError("cpu"))
    with pytest.raises(UsageError, match="auto, off, bf16 or fp16"):
        amp_dtype(torch.device("cpu"), "fp8")


def test_schedule_warms_up_then_decays_to_min_lr():
    values = [warmup_cosine(step, 100, 10, 1e-3, 1e-5) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[100] == pytest.approx(1e-2)


def test_poly_and_constant_schedules_after_the_same_warm_up(multieye_shards, tmp_path):
    from kdcli.engine.loop import lr_multiplier

    poly = [lr_multiplier("poly", step, 100, 10, 1e-3, 1e-5) for step in range(101)]
    constant = [lr_multiplier("constant", step, 100, 10, 1e-3, 1e-5) for step in range(101)]
    assert poly[:10] == constant[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert poly[55] == pytest.approx(0.5**0.9) and poly[100] == pytest.approx(1e-2)  # floored at min_lr
    assert constant[10:] == [1.0] * 91
    cfg = quick(multieye_shards, tmp_path / "p.pt", schedule="constant", warmup_epochs=0, lr=3e-3)
    teach(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "p.metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(3e-3)  # still the base rate at the end
    with pytest.raises(UsageError, match="schedule"):
        quick(multieye_shards, tmp_path / "x.pt", schedule="step")


def test_unknown_metric_is_a_clear_error(multieye_shards, tmp_path):
    from kdcli.errors import KdcliError

    with pytest.raises(KdcliError, match="metric=dice"):
        teach(quick(multieye_shards, tmp_path / "x.pt", metric="dice"), log=lambda m: None)


def test_early_stop_after_patience(multieye_shards, tmp_path):
    # lr 0: nothing improves after the first epoch, so patience 1 stops at epoch 2 of 5
    result = teach(quick(multieye_shards, tmp_path / "p.pt", epochs=5, lr=1e-12, min_lr=1e-13, patience=1),
                   log=lambda m: None)
    assert result.epochs_run == 2 and result.best_epoch == 1


def test_set_values_of_model_options_arrive_typed():
    """`--set concept_dim=16` (or a quoted config value) is text; the model options get their own types."""
    cfg = resolve_config({"concept_dim": "16", "concept_scale": "10", "output_stride": "8", "cache_teacher": "yes"})
    assert (cfg.concept_dim, cfg.concept_scale, cfg.output_stride, cfg.cache_teacher) == (16, 10.0, 8, True)
    with pytest.raises(UsageError, match="concept_dim: expected int, got 'wide'"):
        resolve_config({"concept_dim": "wide"})


def test_pretrained_backbone_comes_from_a_local_file_only(multieye_shards, tmp_path):
    import timm

    donor = timm.create_model("test_resnet", num_classes=0, in_chans=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, tmp_path / "w.pth")
    cfg = quick(multieye_shards, tmp_path / "pre.pt", pretrained=str(tmp_path / "w.pth"), lr=1e-12, min_lr=1e-13)
    from kdcli.shards.reader import ShardStore
    from kdcli.train import build_student

    model = build_student(cfg, ShardStore(multieye_shards), "fundus")
    key = next(k for k in donor.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(model.backbone.state_dict()[key], donor.state_dict()[key])
    from kdcli.errors import KdcliError

    with pytest.raises(KdcliError, match="not found"):
        build_student(quick(multieye_shards, tmp_path / "q.pt", pretrained=str(tmp_path / "none.pth")),
                      ShardStore(multieye_shards), "fundus")


@pytest.mark.slow
def test_compile_trains_through_torch_compile_and_saves_plain_weights(multieye_shards, tmp_path):
    """--compile: the step runs the torch.compile'd student (inductor on CPU: needs a C compiler, as on CI)."""
    from kdcli.engine import loop

    compiled = []
    original = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(model)
        return original(model, *args, **kwargs)

    loop.torch.compile = spy
    try:
        result = teach(quick(multieye_shards, tmp_path / "c.pt", compile=True), log=lambda m: None)
    finally:
        loop.torch.compile = original
    assert len(compiled) == 1 and result.epochs_run == 1
    weights = load_checkpoint(tmp_path / "c.pt").model
    assert weights and not any(k.startswith("_orig_mod") for k in weights)  # loadable without compiling


@pytest.mark.parametrize(("extra", "words"), [
    (["--output-stride", "7"], "8, 16 or 32"),
    (["--embeddings", "resnet18-abc"], "slide datasets"),
])
def test_options_for_other_kinds_of_model_are_refused_in_one_line(multieye_shards, tmp_path, extra, words):
    result = kdcli_run("teach", "--data", str(multieye_shards), "--modality", "fundus", "--model",
                       "test_resnet", "--epochs", "1", "--workers", "0", "--out",
                       str(tmp_path / "m.pt"), *extra, ok=False)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:") and words in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()


def test_deterministic_kernels_on_cpu_autotuned_on_gpus_and_switchable(multieye_shards, tmp_path):
    from kdcli.engine.device import deterministic_mode

    assert deterministic_mode(torch.device("cpu")) is True
    assert deterministic_mode(torch.device("cuda", 0)) is False  # cudnn.benchmark, as timm and nnU-Net train
    assert deterministic_mode(torch.device("cuda", 0), "on") is True
    try:
        teach(quick(multieye_shards, tmp_path / "f.pt", deterministic="off"), log=lambda m: None)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        teach(quick(multieye_shards, tmp_path / "a.pt", overwrite=True), log=lambda m: None)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    with pytest.raises(UsageError, match="deterministic"):
        teach(quick(multieye_shards, tmp_path / "x.pt", deterministic="sometimes"), log=lambda m: None)
