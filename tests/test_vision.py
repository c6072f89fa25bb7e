"""Vision projectors: found beside a model as llama.cpp pairs them, read, fitted and placed, and
their figures checked against llama.cpp's own clip buffer lines (a tiny random-weight Gemma 3
projector loaded through llama-cpp-python's mtmd bindings)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from localllm.cli.flags import add_settings_flags, settings_from_args
from localllm.errors import GGUFError
from localllm.fitter import FitRequest, fit, fit_header, format_plan
from localllm.gguf_header import TensorInfo, read_header
from localllm.hardware import GIB, Hardware, HostInfo, parse_gpu_names
from localllm.models import model_files
from localllm.router.registry import Registry
from localllm.settings import Settings
from localllm.vision import (
    best_projector,
    find_projector,
    projector_for,
    projector_from_header,
    projector_path,
    read_projector,
)
from tests import tiny_vision as tv
from tests.tiny_models import write_gemma3_swa

MIB = 1024 * 1024
HOST = HostInfo(64 * GIB, 56 * GIB, 8, 16, 60e9, 1e12, "assumed")
RTX3090 = Hardware(parse_gpu_names("rtx3090"), HOST, 16)
CPU_ONLY = Hardware((), HOST, 16)
# Gemma 3 27B's projector as its converter writes it: SigLIP-So400m at 896 px
GEMMA3_27B_VISION = tv.VisionSpec(
    image_size=896, patch_size=14, n_embd=1152, n_ff=4304, n_layer=27, n_head=16,
    projection_dim=5376,
)


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 text model with its projector beside it, as a hub repo lays them out."""
    folder = tmp_path_factory.mktemp("vision")
    write_gemma3_swa(folder / "tiny-gemma3-F16.gguf")
    tv.write_gemma3_mmproj(folder / "mmproj-tiny-gemma3-F16.gguf")
    return folder


def _header_projector(spec: tv.VisionSpec) -> object:
    infos = []
    for name, shape, _ in tv.tensor_plan(spec):
        n = 1
        for dim in shape:
            n *= dim
        size = n * (2 if len(shape) > 1 else 4)
        infos.append(TensorInfo(name, "F16" if len(shape) > 1 else "F32", shape, 0, n, size))
    return projector_from_header(Path("mmproj-gemma-3-27b-f16.gguf"), tv.metadata(spec), infos)


# ------------------------------------------------------------------------- discovery


def test_best_projector_follows_llama_cpp_pairing() -> None:
    files = [
        "gemma-3-4b-it-Q4_K_M.gguf",
        "gemma-3-4b-it-Q8_0.gguf",
        "mmproj-model-f16.gguf",
        "mmproj-model-Q8_0.gguf",
        "sub/mmproj-other-f16.gguf",
        "README.md",
    ]
    # closest quant bits: Q8_0 beside Q8_0, F16 (16 bits) is nearer to Q8 than to Q4? |16-4|=12,
    # |8-4|=4: a Q4 model gets the Q8_0 projector, as find_best_sibling picks
    assert best_projector(files, "gemma-3-4b-it-Q8_0.gguf") == "mmproj-model-Q8_0.gguf"
    assert best_projector(files, "gemma-3-4b-it-Q4_K_M.gguf") == "mmproj-model-Q8_0.gguf"
    assert best_projector(files, "gemma-3-4b-it-F16.gguf") == "mmproj-model-f16.gguf"
    # a projector in a deeper folder than the model is not its sibling; one in the model's
    # own sub-folder wins over one above it
    assert best_projector(["sub/mmproj-x-f16.gguf"], "model-Q4_K_M.gguf") is None
    nested = ["mmproj-top-f16.gguf", "Q4/mmproj-q4-f16.gguf", "Q4/model-Q4_K_M.gguf"]
    assert best_projector(nested, "Q4/model-Q4_K_M.gguf") == "Q4/mmproj-q4-f16.gguf"
    assert best_projector(["model-Q4_K_M.gguf"], "model-Q4_K_M.gguf") is None


def test_projector_beside_a_model_is_found_and_never_listed_as_a_model(
    vision_folder: Path,
) -> None:
    model = vision_folder / "tiny-gemma3-F16.gguf"
    assert find_projector(model) == vision_folder / "mmproj-tiny-gemma3-F16.gguf"
    assert [p.name for p in model_files(vision_folder)] == ["tiny-gemma3-F16.gguf"]
    assert projector_path(model, "off") is None
    assert projector_path(model, "/x/mmproj.gguf") == Path("/x/mmproj.gguf")
    # the header says so too, whatever the name
    header_only = read_projector(vision_folder / "mmproj-tiny-gemma3-F16.gguf")
    assert header_only.projector_type == "gemma3"


def test_a_model_file_is_not_a_projector(vision_folder: Path) -> None:
    with pytest.raises(GGUFError, match="not a multimodal projector"):
        read_projector(vision_folder / "tiny-gemma3-F16.gguf")


def test_no_mmproj_flag_and_setting() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_flags(parser, ["mmproj", "mmproj_offload"])
    settings, _ = settings_from_args(parser.parse_args(["--no-mmproj"]))
    assert settings.mmproj == "off"
    settings, _ = settings_from_args(parser.parse_args(["--mmproj", "/m/mmproj-x.gguf",
                                                        "--no-mmproj-offload"]))
    assert settings.mmproj == "/m/mmproj-x.gguf" and settings.mmproj_offload is False
    settings, _ = settings_from_args(parser.parse_args([]))
    assert settings.mmproj == "auto" and settings.mmproj_offload is True


def test_registry_lists_vision_unless_mmproj_off(vision_folder: Path, tmp_path: Path) -> None:
    def caps(**changes: object) -> dict[str, list[str]]:
        settings = Settings(models_dir=vision_folder, load_on_start=False, **changes)
        return {e.name: e.capabilities for e in Registry(settings).entries()}

    found = caps()
    assert list(found) == ["tiny-gemma3-F16"]  # the projector is no model of its own
    assert "vision" in found["tiny-gemma3-F16"]
    assert "vision" not in caps(mmproj="off")["tiny-gemma3-F16"]


# ------------------------------------------------------------------------- figures


def test_projector_figures_from_the_header(vision_folder: Path) -> None:
    spec = tv.VisionSpec()
    projector = read_projector(vision_folder / "mmproj-tiny-gemma3-F16.gguf")
    assert projector.weights_bytes == tv.tensor_bytes(spec)  # F16 matrices, F32 vectors
    assert projector.n_merge == 4  # Gemma 3's pooling, no scale_factor key
    assert projector.image_tokens == (224 // 14 // 4) ** 2 == 16
    # the image (f32) and its im2col copy (f16, the kernel's type) dominate at tiny widths
    assert projector.compute_bytes(True) == 3 * 224 * 224 * (4 + 2)


def test_gemma3_27b_projector_costs_what_llama_cpp_reports() -> None:
    """Real dimensions, header only: 256 tokens per image, ~808 MiB of F16 weights, the encoder's
    buffer 121.25 MiB with flash attention and 1132 MiB without (16 heads x 4096^2 scores)."""
    projector = _header_projector(GEMMA3_27B_VISION)
    assert projector.image_tokens == 256  # type: ignore[attr-defined]
    weights = projector.weights_bytes  # type: ignore[attr-defined]
    assert 800 * MIB < weights < 830 * MIB
    assert projector.compute_bytes(True) == 4 * 4096 * (4304 + 3 * 1152)  # type: ignore[attr-defined]
    assert projector.compute_bytes(False) == 1132 * MIB  # type: ignore[attr-defined]


def test_dynamic_projector_counts_its_largest_image() -> None:
    spec = tv.VisionSpec(projector_type="qwen2.5vl_merger", image_size=560, n_embd=1280,
                         n_ff=3420, n_head=16, n_layer=32, projection_dim=3584)
    projector = _header_projector(spec)
    assert projector.image_tokens == 4096  # type: ignore[attr-defined]
    assert projector.encoder_patches == 4096 * 4  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- fitting


def test_fit_places_the_projector_on_the_gpu_and_counts_it(vision_folder: Path) -> None:
    model = vision_folder / "tiny-gemma3-F16.gguf"
    header = read_header(model)
    request = FitRequest(n_ctx=1024)
    plain = fit_header(header, RTX3090, request)
    projector = read_projector(vision_folder / "mmproj-tiny-gemma3-F16.gguf")
    planned = fit(model, RTX3090, request)  # `fit` finds the projector beside the model
    assert planned.projector == projector and planned.projector_device == "CUDA0"
    cost = projector.weights_bytes + projector.compute_bytes(planned.flash_attn)
    assert planned.gpus[0].projector_bytes == cost
    assert planned.gpus[0].total_bytes == plain.gpus[0].total_bytes + cost
    assert planned.host.total_bytes == plain.host.total_bytes
    text = format_plan(planned)
    assert "vision projector gemma3 on CUDA0" in text and "one image = 16 tokens" in text
    assert "--mmproj" in planned.llama_server_command()
    assert planned.to_dict()["projector"]["image_tokens"] == 16
    assert planned.to_dict()["devices"][0]["projector_bytes"] == cost


def test_fit_without_gpu_or_offload_puts_it_on_the_host(vision_folder: Path) -> None:
    model = vision_folder / "tiny-gemma3-F16.gguf"
    on_cpu = fit(model, CPU_ONLY, FitRequest(n_ctx=1024))
    assert on_cpu.projector_device == "host" and on_cpu.host.projector_bytes > 0
    kept = fit(model, RTX3090, FitRequest(n_ctx=1024, mmproj_offload=False))
    assert kept.projector_device == "host" and kept.gpus[0].projector_bytes == 0
    assert "--no-mmproj-offload" in kept.llama_server_command()
    off = fit(model, RTX3090, FitRequest(n_ctx=1024, mmproj="off"))
    assert off.projector is None and all(d.projector_bytes == 0 for d in off.devices)


def test_a_big_projector_can_tip_a_plan_over(vision_folder: Path) -> None:
    """The projector takes its share of the card: a GPU that holds the model alone does not hold
    model and projector, and the plan says so."""
    model = vision_folder / "tiny-gemma3-F16.gguf"
    header = read_header(model)
    big = replace(_header_projector(GEMMA3_27B_VISION))  # type: ignore[type-var]
    request = FitRequest(n_ctx=1024, n_gpu_layers=-1, gpu_margin_bytes=0)
    alone = fit_header(header, RTX3090, request)
    need = alone.gpus[0].total_bytes
    card = Hardware(parse_gpu_names("rtx3090"), HOST, 16)
    small_gpu = replace(card, gpus=(replace(card.gpus[0], free_bytes=need + 64 * MIB),))
    assert fit_header(header, small_gpu, request).fits
    with_projector = fit_header(header, small_gpu, replace(request, projector=big))
    assert not with_projector.fits


# ------------------------------------------------------------------------- against llama.cpp


@pytest.mark.parametrize(
    ("spec", "flash_attn"),
    [
        (tv.VisionSpec(), None),  # llama.cpp's auto: enabled on the CPU
        (tv.VisionSpec(), False),
        (tv.VisionSpec(image_size=448, n_embd=256, n_ff=1024, n_head=8), None),
        (tv.VisionSpec(image_size=448, n_embd=256, n_ff=1024, n_head=8), False),
    ],
)
def test_projector_figures_match_llama_cpp(
    vision_folder: Path, tmp_path: Path, spec: tv.VisionSpec, flash_attn: bool | None
) -> None:
    mmproj = tmp_path / "mmproj-check-F16.gguf"
    tv.write_gemma3_mmproj(mmproj, spec)
    measured = tv.load_with_mtmd(mmproj, vision_folder / "tiny-gemma3-F16.gguf", flash_attn)
    projector = projector_for(vision_folder / "tiny-gemma3-F16.gguf", str(mmproj))
    assert projector is not None
    # llama.cpp prints MiB with two decimals: equal to within that rounding (and a byte)
    tolerance = 0.005 * MIB + 1
    assert abs(projector.weights_bytes - measured.model_bytes) <= tolerance
    predicted = projector.compute_bytes(measured.flash_attn)
    assert abs(predicted - measured.compute_bytes) <= tolerance, (predicted, measured)


def test_ollama_show_lists_vision(vision_folder: Path) -> None:
    from types import SimpleNamespace

    from localllm.server.ollama.catalog import Catalog

    model = vision_folder / "tiny-gemma3-F16.gguf"

    def caps(mmproj: str) -> list[str]:
        state = SimpleNamespace(router=None, model_id="m", model_names={"m"}, engine=None,
                                settings=Settings(mmproj=mmproj))
        return Catalog(state, model).capabilities("m")  # type: ignore[arg-type]

    assert "vision" in caps("auto")
    assert "vision" not in caps("off")


# ------------------------------------------------------------------------- hub


def test_pull_fetches_the_projector_as_llama_server_hf(
    vision_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm.pull import ensure_local, pull
    from tests.fake_hub import FakeHub, running_hub

    model = vision_folder / "tiny-gemma3-F16.gguf"
    mmproj = vision_folder / "mmproj-tiny-gemma3-F16.gguf"
    fake = FakeHub()
    fake.add("org/tiny-vision-GGUF", model)
    fake.add("org/tiny-vision-GGUF", mmproj, name="mmproj-model-f16.gguf")
    fake.add("org/tiny-vision-GGUF", mmproj, name="mmproj-model-Q8_0.gguf")
    fake.add("org/other-vision-GGUF", model, name="other-F16.gguf")
    fake.add("org/other-vision-GGUF", mmproj, name="mmproj-model-f16.gguf")
    with running_hub(fake):
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        models = tmp_path / "models"
        settings = Settings(models_dir=models)
        path = pull("org/tiny-vision-GGUF", settings, progress=False)
        assert path.name == "tiny-gemma3-F16.gguf"  # the quant choice is unchanged
        # the F16 projector (closest in bits to the F16 model), named after its model
        assert sorted(p.name for p in models.glob("*.gguf")) == [
            "mmproj-tiny-gemma3-F16.gguf", "tiny-gemma3-F16.gguf"
        ]
        assert "mmproj-model-Q8_0.gguf" not in fake.sent_bytes
        other = pull("org/other-vision-GGUF:F16", settings, progress=False)
        # two repos' `mmproj-model-f16.gguf` in one flat folder: each model keeps its own
        assert find_projector(other) == models / "mmproj-other-F16.gguf"
        assert find_projector(path) == models / "mmproj-tiny-gemma3-F16.gguf"
        registry = Registry(Settings(models_dir=models, load_on_start=False))
        entries = {e.name: e for e in registry.entries()}
        assert sorted(entries) == ["other-F16", "tiny-gemma3-F16"]
        assert all("vision" in e.capabilities for e in entries.values())
        # pulled again: nothing is fetched twice
        sent = fake.total_sent()
        pull("org/tiny-vision-GGUF:F16", settings, progress=False)
        assert fake.total_sent() == sent
        # `chat/serve ORG/REPO` brings it too; --no-mmproj does not
        fresh = Settings(models_dir=tmp_path / "fresh")
        ensure_local("org/tiny-vision-GGUF:F16", fresh)
        assert (tmp_path / "fresh" / "mmproj-tiny-gemma3-F16.gguf").is_file()
        off = Settings(models_dir=tmp_path / "off", mmproj="off")
        pull("org/tiny-vision-GGUF:F16", off, progress=False)
        assert [p.name for p in (tmp_path / "off").glob("*.gguf")] == ["tiny-gemma3-F16.gguf"]


def test_qwen25vl_projector_loads_and_its_weights_and_tokens_match(
    vision_folder: Path, tmp_path: Path
) -> None:
    """The second family: llama.cpp loads it; weights match; one image takes up to 4096 tokens;
    its compute buffer is modelled from its own graph (checked in detail in
    test_vision_fit.py): llama.cpp reserves it for a 1288 px warm-up image at load and grows it
    for larger ones, so the plan counts the largest image and the load-time figure apart."""
    mmproj = tmp_path / "mmproj-qwen-F16.gguf"
    tv.write_qwen25vl_mmproj(mmproj)
    measured = tv.load_with_mtmd(mmproj, vision_folder / "tiny-gemma3-F16.gguf", None)
    projector = read_projector(mmproj)
    assert abs(projector.weights_bytes - measured.model_bytes) <= 0.005 * MIB + 1
    assert projector.image_tokens == 4096 and projector.compute_measured
    assert any("warmup with image size = 1288 x 1288" in line for line in measured.lines)
    warmup = projector.warmup_compute_bytes(measured.flash_attn)
    assert abs(warmup - measured.compute_bytes) <= 0.005 * MIB + 1
    assert projector.compute_bytes(measured.flash_attn) > warmup
