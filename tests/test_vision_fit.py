"""The plan's projector figures against llama.cpp's own, for the Qwen-VL families (Qwen2-VL,
Qwen2.5-VL with and without window attention): tiny random-weight projectors loaded through
llama-cpp-python's mtmd bindings on the CPU, their `compute buffer size` line read, at several
widths, heads, patch sizes, image sizes and with flash attention on and off. Then the projector
in `fit ORG/REPO` (headers by range requests), in a folder of quants, and in the router's
placement of several models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.gguf_header import TensorInfo
from localllm.router.registry import Registry
from localllm.settings import Settings
from localllm.vision import Projector, projector_from_header, read_projector
from localllm.vision.ggml_graph import F32, Graph
from tests import tiny_vision as tv
from tests.tiny_models import write_gemma3_swa

MIB = 1024 * 1024
# llama.cpp prints MiB with two decimals: equal to within that rounding (and a byte)
PRINTED = 0.005 * MIB + 1


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text model for mtmd to pair with (64 wide: the projectors project into 64)."""
    path = tmp_path_factory.mktemp("vision-fit") / "tiny-gemma3-F16.gguf"
    write_gemma3_swa(path)
    return path


# ------------------------------------------------------------------------- the allocator


def test_allocator_reuses_memory_in_place_and_frees_after_the_last_use() -> None:
    """ggml-alloc's rules on a small graph: an add writes into its parent's memory when that
    parent has no other consumer; a tensor's memory is free once its last consumer has run."""
    g = Graph()
    x = g.input(1024, name="x")  # 4 KiB, allocated first (an input)
    a = g.unary(x, "unary")  # 4 KiB: x is still needed below, so not in place
    b = g.add(a, g.weight(1024, dtype=F32))  # in place over a
    c = g.mul_mat(g.weight(1024, 2048), b)  # 8 KiB
    d = g.add(c, x)  # in place over c; x and b are free now
    e = g.mul_mat(g.weight(2048, 1024), d)  # 4 KiB: fits in the hole x and a left
    assert g.buffer_bytes([e], alignment=32) == 4096 + 4096 + 8192


# ------------------------------------------------------------------------- against llama.cpp


WARMUP_SHAPES = [
    # (spec, flash attention): widths, heads, FFN, patch size, window attention, both families
    (tv.QwenVisionSpec(), True),
    (tv.QwenVisionSpec(), False),
    (tv.QwenVisionSpec(n_embd=128, n_ff=384, n_head=2, n_layer=4, patch_size=16,
                       n_wa_pattern=4), True),
    (tv.QwenVisionSpec(n_embd=128, n_ff=384, n_head=2, n_layer=4, patch_size=16,
                       n_wa_pattern=4), False),
    (tv.QwenVisionSpec(n_embd=256, n_ff=1024, n_head=8), True),
    (tv.QwenVisionSpec(n_embd=96, n_ff=200, n_head=3), False),
    (tv.QwenVisionSpec(projector_type="qwen2vl_merger", n_embd=256, n_ff=1024, n_head=8), True),
    (tv.QwenVisionSpec(projector_type="qwen2vl_merger", n_embd=128, n_ff=512, n_layer=3,
                       patch_size=16), False),
    # Gemma 3 (fixed size: the warm-up image is the only one), replayed as the others
    (tv.VisionSpec(image_size=320, patch_size=16, n_embd=128, n_ff=512, n_head=2), True),
    (tv.VisionSpec(image_size=448, n_embd=192, n_ff=768, n_head=6, n_layer=3), False),
    # Gemma 4: clamped linears, per-head norms, x/y position tables, 3x3 pooling
    (tv.Gemma4VisionSpec(), True),
    (tv.Gemma4VisionSpec(), False),
    (tv.Gemma4VisionSpec(n_embd=128, n_ff=512, n_head=2, std_scale=True), True),
    # InternVL: a CLS token, layer scales, pixel shuffle; one 224 px tile here
    (tv.InternVisionSpec(), True),
    (tv.InternVisionSpec(n_embd=256, n_ff=1024, n_head=4), False),
    (tv.InternVisionSpec(image_size=448, n_embd=128, n_ff=512, n_head=2), True),
    # Idefics3 / SmolVLM: SigLIP, pixel unshuffle, one projection; one tile here
    (tv.Idefics3VisionSpec(), True),
    (tv.Idefics3VisionSpec(n_embd=256, n_ff=1024, n_head=4), False),
    # Pixtral / Mistral Small 3.x: 2D RoPE, a 16 x 16-token warm-up, the patch merger or none
    (tv.PixtralVisionSpec(), True),
    (tv.PixtralVisionSpec(n_merge=1, patch_size=16), False),
    (tv.PixtralVisionSpec(n_embd=128, n_ff=256, n_head=2, biases=True), False),
    (tv.PixtralVisionSpec(n_embd=256, n_ff=512, n_head=4), True),
    # Qwen3-VL: learned positions resized (8 x 8 grid) or not (92 x 92: the warm-up's), deepstack
    (tv.Qwen3VisionSpec(), True),
    (tv.Qwen3VisionSpec(pos_embd_side=92, patch_size=14), False),
    (tv.Qwen3VisionSpec(n_embd=256, n_ff=1024, n_head=4), True),
    (tv.Qwen3VisionSpec(n_embd=128, n_ff=384, n_head=2, deepstack_layers=(1,),
                        projection_dim=32), False),
]


@pytest.mark.parametrize(("spec", "flash_attn"), WARMUP_SHAPES)
def test_warmup_buffer_matches_llama_cpp(
    text_model: Path, tmp_path: Path,
    spec: tv.VisionSpec | tv.AnySpec, flash_attn: bool,
) -> None:
    """The compute buffer llama.cpp reserves at load (its 46 x 46-token warm-up image) equals
    the plan's replay of ggml's allocator over the same graph, to the printed 0.01 MiB."""
    mmproj = tmp_path / "mmproj-F16.gguf"
    if isinstance(spec, tv.VisionSpec):
        tv.write_gemma3_mmproj(mmproj, spec)
    else:
        tv.write_qwen_mmproj(mmproj, spec)
    measured = tv.load_with_mtmd(mmproj, text_model, flash_attn)
    projector = read_projector(mmproj)
    assert projector.compute_measured and measured.flash_attn == flash_attn
    if isinstance(spec, (tv.VisionSpec, tv.InternVisionSpec, tv.Idefics3VisionSpec)):
        assert projector.warmup_side == spec.image_size
    elif isinstance(spec, tv.PixtralVisionSpec):
        assert projector.warmup_side == 16 * spec.patch_size * spec.n_merge
    elif isinstance(spec, tv.Gemma4VisionSpec):
        assert projector.warmup_side == 16 * spec.patch_size * 3
    else:
        assert projector.warmup_side == 46 * spec.patch_size * 2
    assert any(f"warmup with image size = {projector.warmup_side} x" in line
               for line in measured.lines)
    assert abs(projector.weights_bytes - measured.model_bytes) <= PRINTED
    predicted = projector.warmup_compute_bytes(flash_attn)
    assert abs(predicted - measured.compute_bytes) <= PRINTED, (predicted, measured.compute_bytes)


@pytest.mark.parametrize(
    ("spec", "flash_attn", "image"),
    [
        (tv.QwenVisionSpec(n_layer=1), True, (896, 560)),  # not square, below the warm-up size
        (tv.QwenVisionSpec(n_layer=1, n_wa_pattern=2), False, (448, 1120)),
        (tv.Qwen3VisionSpec(n_layer=2, deepstack_layers=(1,), projection_dim=32), True,
         (640, 1024)),
        (tv.PixtralVisionSpec(), False, (896, 448)),
        (tv.Gemma4VisionSpec(), True, (960, 528)),
        (tv.InternVisionSpec(max_tiles=4), False, (896, 896)),  # 2 x 2 tiles and an overview
        (tv.Idefics3VisionSpec(), True, (896, 896)),  # 448 px longest edge: 2 x 2 tiles
    ],
)
def test_qwen_vl_buffer_for_an_image_matches_llama_cpp(
    text_model: Path, tmp_path: Path, spec: tv.AnySpec, flash_attn: bool,
    image: tuple[int, int],
) -> None:
    """An image of another size: llama.cpp reserves for the image it encodes (no warm-up at
    load), and counts its tokens; both equal the plan's."""
    mmproj = tmp_path / "mmproj-qwen-F16.gguf"
    tv.write_qwen_mmproj(mmproj, spec)
    measured = tv.load_with_mtmd(mmproj, text_model, flash_attn, image=image)
    projector = read_projector(mmproj)
    width, height = image
    if isinstance(spec, (tv.InternVisionSpec, tv.Idefics3VisionSpec)):  # a tile at a time
        width = height = spec.image_size
    predicted = projector.image_compute_bytes(width, height, flash_attn)
    assert abs(predicted - measured.compute_bytes) <= PRINTED, (predicted, measured.compute_bytes)
    if isinstance(spec, tv.InternVisionSpec):  # the most tiles and the overview
        assert measured.image_tokens == projector.image_tokens == 5 * 64
    elif isinstance(spec, tv.Idefics3VisionSpec):  # 2 x 2 tiles and the overview, 16 each
        assert measured.image_tokens == projector.image_tokens == 5 * 16
    elif isinstance(spec, tv.PixtralVisionSpec):  # an [IMG_BREAK] after each row but the last
        merged = spec.patch_size * spec.n_merge
        rows = height // merged
        assert measured.image_tokens == (width // merged) * rows + rows - 1
    else:
        merged = spec.patch_size * (3 if isinstance(spec, tv.Gemma4VisionSpec) else 2)
        assert measured.image_tokens == (width // merged) * (height // merged)


def test_qwen_vl_largest_image_is_what_the_plan_counts(text_model: Path, tmp_path: Path) -> None:
    """The plan counts the largest image llama.cpp accepts (4096 tokens, 1792 px at 14 px
    patches): encoding one, mtmd counts 4096 tokens and reserves the plan's compute buffer (the
    warm-up reservation at load is smaller; llama.cpp grows it then)."""
    mmproj = tmp_path / "mmproj-qwen-F16.gguf"
    tv.write_qwen_mmproj(mmproj, tv.QwenVisionSpec(n_layer=1))
    projector = read_projector(mmproj)
    assert projector.image_tokens == 4096 and projector.image_side == 1792
    measured = tv.load_with_mtmd(mmproj, text_model, True, image=(1792, 1792))
    assert measured.image_tokens == projector.image_tokens
    assert abs(projector.compute_bytes(True) - measured.compute_bytes) <= PRINTED
    assert projector.compute_bytes(True) > projector.warmup_compute_bytes(True)


def test_qwen25vl_7b_projector_figures() -> None:
    """Qwen2.5-VL 7B's encoder (1280 wide, 32 blocks, 16 heads, 3420 FFN, window attention with
    every 8th block full), header only. At load llama.cpp printed 704.79 MiB (flash attention)
    and 4871.57 MiB (without) for the same widths with 8 blocks (the peak does not depend on the
    depth; a one-off run, 400 MB of weights); the largest image costs more: the N x N window
    mask and, without flash attention, 16 score matrices of 16384^2 floats."""
    spec = tv.QwenVisionSpec(n_embd=1280, n_ff=3420, n_head=16, n_layer=32, n_wa_pattern=8,
                             projection_dim=3584)
    projector = _projector_from_spec(spec)
    assert projector.n_wa_pattern == 8 and projector.ffn_gate
    assert abs(projector.warmup_compute_bytes(True) - 704.79 * MIB) <= PRINTED
    assert abs(projector.warmup_compute_bytes(False) - 4871.57 * MIB) <= PRINTED
    assert abs(projector.compute_bytes(True) - 1893.03 * MIB) <= PRINTED
    assert abs(projector.compute_bytes(False) - 17845.03 * MIB) <= PRINTED
    assert projector.image_tokens == 4096


def _projector_from_spec(spec: tv.QwenVisionSpec) -> Projector:
    """A projector record from the keys and tensor shapes `write_qwen_mmproj` would write,
    without writing a gigabyte of weights."""
    return _projector(*tv.qwen_header(spec))


def _projector(
    metadata: dict[str, object], plan: list[tuple[str, tuple[int, ...], float | None]]
) -> Projector:
    infos = []
    for name, shape, _ in plan:
        n = 1
        for dim in shape:
            n *= dim
        size = n * (2 if len(shape) > 1 else 4)
        infos.append(TensorInfo(name, "F16" if len(shape) > 1 else "F32", shape, 0, n, size))
    return projector_from_header(Path("mmproj-tiny.gguf"), metadata, infos)


# ------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def quant_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two quantizations of one vision model and its projector, as a hub repo holds them."""
    folder = tmp_path_factory.mktemp("quants")
    write_gemma3_swa(folder / "tiny-vl-F16.gguf")
    (folder / "tiny-vl-Q8_0.gguf").write_bytes((folder / "tiny-vl-F16.gguf").read_bytes())
    tv.write_qwen_mmproj(folder / "mmproj-tiny-vl-F16.gguf", tv.QwenVisionSpec(n_wa_pattern=2))
    return folder


def _cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localllm", *args], capture_output=True, text=True, timeout=120,
        cwd=cwd, env={**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"), **env},
    )


def test_fit_on_a_folder_of_quants_counts_the_projector_once(
    quant_folder: Path, tmp_path: Path
) -> None:
    projector = read_projector(quant_folder / "mmproj-tiny-vl-F16.gguf")
    text = _cli(tmp_path, {}, "fit", str(quant_folder), "--vram", "8GiB")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("vision projector qwen2.5vl_merger on CUDA0") == 1
    assert "one image = 4096 tokens" in text.stdout
    assert text.stdout.count("--mmproj") == 1
    result = _cli(tmp_path, {}, "fit", str(quant_folder), "--vram", "8GiB", "--json")
    plan = json.loads(result.stdout)
    assert plan["projector"]["compute_bytes"] == projector.compute_bytes(plan["flash_attn"])
    assert plan["projector"]["warmup_compute_bytes"] == projector.warmup_compute_bytes(
        plan["flash_attn"])
    cost = projector.total_bytes(plan["flash_attn"])
    assert plan["devices"][0]["projector_bytes"] == cost
    assert [d["projector_bytes"] for d in plan["devices"]].count(cost) == 1


def test_fit_hub_repo_counts_the_projector_pull_would_fetch(
    quant_folder: Path, tmp_path: Path
) -> None:
    """`fit ORG/REPO` reads the projector's header by range requests, picked by pull's rule
    (llama-server -hf's): the F16 projector for the F16 quant, the Q8_0 one for the Q8_0 quant;
    nothing is downloaded; --no-mmproj leaves it out."""
    from tests.fake_hub import FakeHub, running_hub

    # a few MB each, so that a header (read in 1 MiB blocks) is less than the file
    f16, q8 = tmp_path / "mmproj-f16.gguf", tmp_path / "mmproj-q8.gguf"
    tv.write_qwen_mmproj(f16, tv.QwenVisionSpec(n_embd=256, n_ff=1024, n_head=8))
    tv.write_qwen_mmproj(q8, tv.QwenVisionSpec(n_embd=320, n_ff=1024))  # told apart by width
    fake = FakeHub()
    repo = "org/tiny-vl-GGUF"
    fake.add(repo, quant_folder / "tiny-vl-F16.gguf")
    fake.add(repo, quant_folder / "tiny-vl-Q8_0.gguf")
    fake.add(repo, f16, name="mmproj-model-f16.gguf")
    fake.add(repo, q8, name="mmproj-model-Q8_0.gguf")
    with running_hub(fake):
        env = {"HF_ENDPOINT": fake.url}
        runs = {}
        for quant in ("F16", "Q8_0"):
            result = _cli(tmp_path, env, "fit", f"{repo}:{quant}", "--vram", "8GiB", "--json")
            assert result.returncode == 0, result.stderr
            runs[quant] = json.loads(result.stdout)
        assert runs["F16"]["projector"]["file"] == f"{repo}/mmproj-model-f16.gguf"
        assert runs["Q8_0"]["projector"]["file"] == f"{repo}/mmproj-model-Q8_0.gguf"
        expected = read_projector(q8)
        fa = runs["Q8_0"]["flash_attn"]
        assert runs["Q8_0"]["projector"]["weights_bytes"] == expected.weights_bytes
        assert runs["Q8_0"]["devices"][0]["projector_bytes"] == expected.total_bytes(fa)
        # headers only: of each projector no more than its header's bytes came over
        for name, path in (("mmproj-model-f16.gguf", f16), ("mmproj-model-Q8_0.gguf", q8)):
            assert 0 < fake.sent_bytes[name] < path.stat().st_size
        file_requests = [r for r in fake.requests if "/resolve/" in r[1]]
        assert all(rng is not None for _, _, rng in file_requests)
        # the whole ladder: each quant with its own projector, shown once; the projectors'
        # headers come from the header cache this time
        sent = {name: fake.sent_bytes[name] for name in ("mmproj-model-f16.gguf",
                                                         "mmproj-model-Q8_0.gguf")}
        ladder = _cli(tmp_path, env, "fit", repo, "--vram", "8GiB")
        assert ladder.returncode == 0, ladder.stderr
        assert {name: fake.sent_bytes[name] for name in sent} == sent
        assert ladder.stdout.count("vision projector qwen2.5vl_merger") == 1
        off = _cli(tmp_path, env, "fit", repo, "--vram", "8GiB", "--no-mmproj", "--json")
        assert off.returncode == 0, off.stderr
        plan = json.loads(off.stdout)
        assert plan["projector"] is None
        assert all(d["projector_bytes"] == 0 for d in plan["devices"])
        assert not list((tmp_path / "cache").rglob("*.gguf"))  # nothing downloaded


def test_router_placement_counts_each_models_projector(tmp_path: Path) -> None:
    """Two vision models in one folder, each with its own projector: what the router places
    (each device's planned total) holds that model's projector, and not the other's."""
    folder = tmp_path / "models"
    folder.mkdir()
    write_gemma3_swa(folder / "alpha-F16.gguf")
    write_gemma3_swa(folder / "beta-F16.gguf", seed=1)
    tv.write_qwen_mmproj(folder / "mmproj-alpha-F16.gguf")
    tv.write_qwen_mmproj(folder / "mmproj-beta-F16.gguf", tv.QwenVisionSpec(n_embd=128))

    def needs(mmproj: str) -> dict[str, tuple[object, dict[str, int]]]:
        registry = Registry(Settings(models_dir=folder, load_on_start=False, mmproj=mmproj))
        found = {}
        for entry in registry.entries():
            plan, _ = registry.planned(entry)
            # the router's placement need: each device's planned total (router._place)
            found[entry.name] = (plan, {d.name: d.total_bytes for d in plan.devices})
        return found

    with_projectors, without = needs("auto"), needs("off")
    costs = set()
    for name, (plan, need) in with_projectors.items():
        assert plan.projector is not None  # type: ignore[attr-defined]
        projector = plan.projector  # type: ignore[attr-defined]
        assert projector.path.name == f"mmproj-{name}.gguf"
        cost = projector.total_bytes(plan.flash_attn)  # type: ignore[attr-defined]
        device = plan.projector_device  # type: ignore[attr-defined]
        plain = without[name][1]
        assert need[device] - plain[device] == cost
        assert all(need[d] == plain[d] for d in need if d != device)
        costs.add(cost)
    assert len(costs) == 2  # each model's own projector


def test_a_hostile_projector_header_is_refused_before_any_replay() -> None:
    """The plan replays the graph block by block: a header claiming a billion blocks (or more
    heads than its width) is refused as implausible, quickly."""
    from localllm.errors import GGUFError

    metadata, plan = tv.qwen_header(tv.QwenVisionSpec())
    for key, value in (("clip.vision.block_count", 10**9), ("clip.vision.attention.head_count",
                                                             4096)):
        hostile = {**metadata, key: value}
        with pytest.raises(GGUFError, match="not plausible"):
            projector_from_header(Path("mmproj-hostile.gguf"), hostile, [])


@pytest.mark.parametrize(
    ("spec", "image", "tokens"),
    [
        (tv.QwenVisionSpec(), (1792, 1792), 4096),  # 64 x 64 tokens of 2x2 patches of 14 px
        (tv.Qwen3VisionSpec(), (2048, 2048), 4096),  # 16 px patches
        (tv.PixtralVisionSpec(), (896, 896), 1024 + 31),  # an [IMG_BREAK] ending 31 rows
        (tv.Gemma4VisionSpec(), (1680, 1536), 1120),  # 35 x 32 tokens of 3x3 patches of 16 px
    ],
)
def test_the_largest_image_the_plan_counts(
    spec: tv.AnySpec, image: tuple[int, int], tokens: int
) -> None:
    """The largest image llama.cpp takes for each dynamic family (its token limit, as square as
    it divides) and the tokens it costs; the plan's compute is for that image."""
    keys, plan = {
        tv.QwenVisionSpec: tv.qwen_header, tv.Qwen3VisionSpec: tv.qwen3_header,
        tv.PixtralVisionSpec: tv.pixtral_header, tv.Gemma4VisionSpec: tv.gemma4_header,
    }[type(spec)](spec)
    projector = _projector(keys, plan)
    assert projector.largest_image == image and projector.image_tokens == tokens
    assert projector.compute_bytes(True) == projector.image_compute_bytes(*image, True)
    assert projector.compute_bytes(True) > projector.warmup_compute_bytes(True)
