"""runtime.memory_format: channels_last training gives the contiguous run's numbers, and
modules go back to contiguous tensors after a stage (exports, later stages)."""

import lightning as L
import pytest
import torch
from stages import make_cfg

from tnexp.callbacks.memory_format import MemoryFormat, resolve_memory_format
from tnexp.errors import ConfigError
from tnexp.factory import tensorize
from tnexp.models import small_resnet
from tnexp.modules import GlobalFinetune, LocalConfig, LocalDistillation
from tnexp.run import run_stage
from tnexp.slicing import make_slice_plan
from tnexp.tasks import ClassificationTask


def _is_channels_last(module: torch.nn.Module) -> bool:
    last = torch.channels_last
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    # 1x1 kernels and single input channels are in both layouts; the others tell them apart
    telling = [w for w in weights if w.is_contiguous() != w.is_contiguous(memory_format=last)]
    return bool(telling) and all(w.is_contiguous(memory_format=last) for w in telling)


class _SeenFormat(L.Callback):
    def __init__(self) -> None:
        self.student: list[bool] = []
        self.teacher: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.student.append(_is_channels_last(pl_module.student))
        if pl_module.teacher is not None:
            self.teacher.append(_is_channels_last(pl_module.teacher))


def test_auto_picks_channels_last_for_convolutions_only():
    assert resolve_memory_format("auto", small_resnet(width=8)) == "channels_last"
    assert resolve_memory_format("auto", torch.nn.Linear(3, 4)) == "contiguous"
    assert resolve_memory_format("contiguous", small_resnet(width=8)) == "contiguous"
    with pytest.raises(ConfigError, match=r"runtime\.memory_format.*channels_last"):
        resolve_memory_format("nhwc", small_resnet(width=8))
    with pytest.raises(ConfigError, match=r"runtime\.memory_format"):
        MemoryFormat("nhwc")


def _fit(method: str, memory_format: str):
    torch.manual_seed(0)
    teacher = small_resnet(width=8).eval()
    student, _ = tensorize(
        teacher, {"rules": [{"pattern": "layer*.*.conv*", "cr": 0.5, "init": "random"}]}
    )
    task = ClassificationTask(10)
    if method == "local":
        plan = make_slice_plan(student, "block")
        module = LocalDistillation(
            student, task, teacher=teacher, plan=plan, local=LocalConfig(loss="mse")
        )
    else:
        module = GlobalFinetune(student, task)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    )
    seen = _SeenFormat()
    losses: list[float] = []

    class _Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MemoryFormat(memory_format), seen, _Losses()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return module, seen, losses


@pytest.mark.parametrize("method", ["local", "global"])
def test_channels_last_trains_like_contiguous_and_is_undone_after_the_stage(method):
    plain, seen_plain, plain_losses = _fit(method, "contiguous")
    fast, seen_fast, fast_losses = _fit(method, "channels_last")
    assert seen_fast.student and all(seen_fast.student)
    assert not any(seen_plain.student)
    if method == "local":
        assert all(seen_fast.teacher)  # the teacher's features come out channels_last too
    # The same training, up to the float summation order of the other layout.
    torch.testing.assert_close(
        torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6
    )
    for (name, a), b in zip(
        fast.student.state_dict().items(), plain.student.state_dict().values(), strict=True
    ):
        assert a.is_contiguous(), name  # back to the usual layout for exports
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    if method == "local":
        assert not _is_channels_last(fast.teacher)  # the teacher is put back as well


def test_a_stage_with_channels_last_exports_its_student(tmp_path):
    teacher = tmp_path / "teacher"
    run_stage(make_cfg(teacher, "method=pretrain", "runtime.memory_format=channels_last"))
    out = tmp_path / "local"
    results = run_stage(
        make_cfg(
            out,
            "method=local",
            f"teacher.path={teacher}",
            "runtime.memory_format=channels_last",
        )
    )
    assert (out / "student" / "model.safetensors").is_file()
    assert results["runtime"]["memory_format"] == "channels_last"


def test_the_local_loss_keeps_channels_last_gradients_and_casts_features_once():
    from tnexp.callbacks.memory_format import module_layout, to_layout
    from tnexp.modules.losses import mse

    last = torch.channels_last
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=last).requires_grad_()
    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=last)
    loss = mse(x, t)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(x, t))
    loss.backward()
    assert x.grad.is_contiguous(memory_format=last)  # F.mse_loss's would be contiguous
    # a float16 NCHW feature from the cache, for a channels_last float32 student
    cached = torch.randn(2, 3, 4, 5).half()
    cast = to_layout(cached, torch.float32, last)
    assert cast.dtype == torch.float32 and cast.is_contiguous(memory_format=last)
    torch.testing.assert_close(cast, cached.float())
    plain = cached.float()
    assert to_layout(plain, torch.float32, torch.contiguous_format) is plain  # no copy
    # the layout the objective casts to is the student's (the first telling weight)
    net = small_resnet(width=8)  # its stem has one input channel: in both layouts
    assert module_layout(net) is torch.contiguous_format
    assert module_layout(net.to(memory_format=last)) is last
    assert module_layout(torch.nn.Linear(3, 4)) is torch.contiguous_format


def test_restored_nchw_optimizer_moments_are_aligned_before_fused_adam_steps(tmp_path):
    # torch's fused CPU Adam silently mis-updates parameters whose moments have other
    # strides; resuming an NCHW checkpoint into a channels_last run must not do that.
    import copy

    from tnexp.callbacks.memory_format import align_optimizer_state

    torch.manual_seed(0)
    reference = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    optimizer = torch.optim.Adam([reference], lr=1e-3, fused=True)
    reference.grad = torch.randn_like(reference)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # NCHW moments
    after_one_step = reference.detach().clone()
    grad = torch.randn(8, 4, 3, 3)

    def resumed(align: bool) -> torch.Tensor:
        start = after_one_step.contiguous(memory_format=torch.channels_last)
        param = torch.nn.Parameter(start)
        restored = torch.optim.Adam([param], lr=1e-3, fused=True)
        restored.load_state_dict(copy.deepcopy(saved))
        if align:
            assert align_optimizer_state(restored) == 2  # exp_avg, exp_avg_sq
            assert align_optimizer_state(restored) == 0
        param.grad = grad.contiguous(memory_format=torch.channels_last)
        restored.step()
        return param.detach()

    reference.grad = grad.clone()
    optimizer.step()
    torch.testing.assert_close(resumed(align=True), reference.detach())
    assert not torch.allclose(resumed(align=False), reference.detach(), atol=1e-4)
