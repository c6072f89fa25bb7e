"""One planning policy for every command: the hardware this build will really use, unless named."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm.engine.build import gpu_offload
from localllm.fitter import fit
from localllm.hardware import detect_gpus, hardware_for
from localllm.loading import check_plan, planning_hardware
from localllm.settings import Settings
from tests.gguf_factory import LLAMA_7B, write_gguf


@pytest.fixture(autouse=True)
def _this_machine_has_no_gpu() -> None:
    if gpu_offload() or detect_gpus():
        pytest.skip("these assertions describe a machine without a GPU or GPU build")


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "llama-7b.Q4_K_M.gguf", LLAMA_7B)


def test_default_plan_is_what_serve_would_load_here(llama: Path) -> None:
    hardware, warnings = planning_hardware(Settings())
    assert hardware.gpus == () and not hardware.assumed and warnings == []
    plan = fit(llama, hardware)
    assert plan.n_gpu_layers == 0 and not plan.gpus
    assert "on the CPU (no GPU in this plan)" in __import__("localllm").format_plan(plan)
    # the library's own default agrees: no GPU found means the CPU, not an imagined card
    assert hardware_for(Settings()).gpus == ()


def test_named_cards_are_planned_for_and_marked_assumed(llama: Path) -> None:
    hardware, _ = planning_hardware(Settings(gpu="rtx4090"))
    assert hardware.assumed and hardware.gpus[0].name == "NVIDIA GeForce RTX 4090"
    plan = fit(llama, hardware)
    assert plan.full_offload and plan.gpus[0].assumed
    assert plan.to_dict()["devices"][0]["assumed"] is True
    assert "(assumed)" in __import__("localllm").format_plan(plan)
    assert any("assumed GPU" in note for note in plan.notes)


def test_serving_ignores_cards_a_cpu_build_cannot_use(llama: Path) -> None:
    hardware, _ = planning_hardware(Settings(gpu="rtx4090"), serving=True)
    assert hardware.gpus == ()


@pytest.mark.parametrize("settings", [Settings(cpu_only=True), Settings(vram="0"),
                                      Settings(gpu="rtx4090", cpu_only=True)])
def test_cpu_only_on_request(settings: Settings, llama: Path) -> None:
    hardware, _ = planning_hardware(settings)
    assert hardware.gpus == () and any("--cpu" in note for note in hardware.notes)


def test_check_runs_llama_cpp_dry_run_for_the_plan(embedded_model_path: Path) -> None:
    hardware, _ = planning_hardware(Settings(cpu_only=True))
    plan = fit(embedded_model_path, hardware)
    rows = {row.what: row for row in check_plan(plan)}
    assert abs(rows["weights (all tensors)"].gap_percent) < 0.01  # logged in 0.01 MiB
    assert rows["KV cache"].gap_percent == 0
    assert rows["output buffer"].llama_cpp_bytes > 0
    assert abs(rows["compute buffer host"].gap_percent) < 10


def test_check_refuses_gpu_plans_on_a_cpu_build(llama: Path) -> None:
    from localllm.errors import SettingsError

    hardware, _ = planning_hardware(Settings(gpu="rtx4090"))
    with pytest.raises(SettingsError, match="add --cpu"):
        check_plan(fit(llama, hardware))
