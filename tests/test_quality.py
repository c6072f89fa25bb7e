"""Quantization quality on the real embedded model and a lower-bit quantization made from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localllm.fitter import load_quality_loss
from localllm.gguf_header import read_header
from localllm.models import quality_sidecar_path
from localllm.quality import QualityResult, default_text, evaluate, format_quality, quantize


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> list[Path]:
    folder = tmp_path_factory.mktemp("quality")
    base = folder / "gemma-3-270m-Q4_K_M.gguf"
    base.symlink_to(embedded_model_path)
    low = quantize(embedded_model_path, folder / "gemma-3-270m-Q2_K.gguf", "Q2_K")
    return [base, low]


@pytest.fixture(scope="module")
def evaluated(ladder: list[Path]) -> list[QualityResult]:
    return evaluate(ladder, n_ctx=128, threads=2)  # stores the losses beside the files


def test_quantize_makes_a_real_lower_bit_model(ladder: list[Path]) -> None:
    base, low = (read_header(p) for p in ladder)
    assert low.file_type == "Q2_K"
    assert low.total_bytes < base.total_bytes
    assert low.n_layer == base.n_layer and low.n_vocab == base.n_vocab


def test_eval_measures_perplexity_and_kl_divergence(
    ladder: list[Path], evaluated: list[QualityResult]
) -> None:
    base, low = ladder
    results = evaluated
    by_type = {r.file_type: r for r in results}
    ref, q2 = by_type["Q4_K_M"], by_type["Q2_K"]
    assert ref.reference == str(base)  # the higher-precision file is the reference
    assert ref.mean_kld == 0.0 and ref.top1_agreement == 1.0
    assert 1.0 < ref.perplexity < 100.0  # a working model on plain English
    assert q2.n_tokens_scored == ref.n_tokens_scored > 100
    # two bits per weight hurt: the distributions move and the perplexity rises
    assert q2.mean_kld is not None and q2.mean_kld > 0.05
    assert q2.ppl_ratio is not None and q2.ppl_ratio > 1.1
    assert q2.top1_agreement is not None and 0.3 < q2.top1_agreement < 0.99
    # stored beside the model for the fitter
    stored = json.loads(quality_sidecar_path(low).read_text())
    assert next(iter(stored.values()))["mean_kld"] == pytest.approx(q2.mean_kld)
    assert load_quality_loss(low) == pytest.approx(q2.mean_kld)
    assert load_quality_loss(base) == 0.0
    table = format_quality(results)
    assert "Q2_K" in table and "reference: gemma-3-270m-Q4_K_M.gguf" in table


def test_text_too_short_is_a_clear_error(ladder: list[Path]) -> None:
    from localllm.errors import LocalLLMError

    with pytest.raises(LocalLLMError, match="give at least 128"):
        evaluate(ladder[:1], text="too short", n_ctx=128, save=False)


def test_default_text_ships_with_the_package() -> None:
    assert len(default_text().split()) > 500


def test_max_quality_loss_changes_the_fitters_choice(
    ladder: list[Path], evaluated: list[QualityResult]
) -> None:
    from localllm.fitter import FitRequest, fit
    from localllm.hardware import hardware_for, parse_gpu_names

    folder = ladder[0].parent
    hardware = hardware_for(None, gpus=parse_gpu_names("rtx4090"))
    fastest = fit(folder, hardware, FitRequest(objective="speed"))
    assert fastest.quant == "Q2_K"  # the smaller file decodes faster
    careful = fit(folder, hardware, FitRequest(objective="speed", max_quality_loss=0.1))
    assert careful.quant == "Q4_K_M"
    reason = dict(careful.rejected)["Q2_K"]
    assert "measured quality loss" in reason and "exceeds --max-quality-loss 0.1" in reason
    # a limit every quant meets changes nothing
    assert (
        fit(folder, hardware, FitRequest(objective="speed", max_quality_loss=5.0)).quant == "Q2_K"
    )
