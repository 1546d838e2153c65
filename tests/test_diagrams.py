"""The concept diagrams (notebooks/diagrams.py): each draws a Figure without pyplot, its labels come
from the code's configs, and the command line writes the six PNG files and nothing else."""
import os
import sys

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import diagrams
import grpo
import mla
import mtp
import train

NAMES = ("model", "mla", "moe", "mtp", "fp8", "grpo")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def texts(fig: Figure) -> str:
    """Every string drawn on the figure (titles, box labels, notes), joined by newlines."""
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.fixture(scope="module")
def drawn() -> dict:
    """Each diagram drawn once at its defaults, shared by the tests below."""
    return {name: draw() for name, draw in diagrams.DIAGRAMS.items()}


def test_the_six_diagrams_are_the_contract():
    assert tuple(diagrams.DIAGRAMS) == NAMES
    for name in NAMES:
        assert diagrams.DIAGRAMS[name] is getattr(diagrams, f"draw_{name}")


@pytest.mark.parametrize("name", NAMES)
def test_each_diagram_is_a_figure_with_axes_built_without_pyplot(drawn, name):
    fig = drawn[name]
    assert isinstance(fig, Figure), f"draw_{name} returned {type(fig).__name__}, not a Figure"
    assert fig.axes, f"draw_{name} drew no Axes"
    # A pyplot figure has a manager (a window, a notebook backend); ours must not.
    assert fig.canvas.manager is None, f"draw_{name} went through pyplot"


def test_a_diagram_renders_itself_as_png_for_jupyter_without_pyplot(drawn):
    # IPython shows an object through _repr_png_ when no pyplot backend registered a formatter.
    assert drawn["fp8"]._repr_png_()[:8] == PNG_MAGIC


def test_mla_shows_the_cache_computed_from_the_code(drawn):
    text = texts(drawn["mla"])
    cached = mla.kv_cache_elements(mla.DEEPSEEK_V3, "mla")[0]
    assert cached == 576
    assert "512 + 64 = 576" in text
    assert "W_UK folded into the query" in text and "W_UV applied after attention" in text
    # Another config draws its own numbers: the miniature caches 64 + 16 = 80.
    tiny = texts(diagrams.draw_mla(train.ModelArgs().mla))
    assert "64 + 16 = 80" in tiny


def test_moe_says_the_bias_selects_and_the_weights_use_the_unbiased_scores(drawn):
    text = texts(drawn["moe"])
    assert "the bias b selects only" in text
    assert "WEIGHT with the unbiased s (no b)" in text
    assert "keep 4 of 8 groups" in text and "top-8" in text
    assert "shared expert" in text


def test_mtp_shows_the_chain_and_the_acceptance_rule(drawn):
    text = texts(drawn["mtp"])
    assert "eh_proj" in text and "shared head" in text
    assert "min(1, p(d) / q(d))" in text
    assert "max(0, p - q)" in text
    assert f"λ = {mtp.MTPConfig().mtp_lambda}" in text


def test_fp8_shows_tiles_blocks_and_the_promotion_interval(drawn):
    text = texts(drawn["fp8"])
    assert "1 x 128 tiles" in text and "128 x 128 blocks" in text
    assert "N_C = 128" in text
    assert "448" in text


def test_grpo_shows_the_loop_with_the_configured_knobs(drawn):
    text = texts(drawn["grpo"])
    cfg = grpo.GRPOConfig()
    assert f"G = {cfg.group_size}" in text
    assert "accuracy" in text and "format" in text
    assert "group-relative advantages" in text and "clip" in text and "β" in text
    other = texts(diagrams.draw_grpo(grpo.GRPOConfig(group_size=4, advantage="std", mu=2)))
    assert "G = 4" in other and "/ std(r)" in other and "μ = 2" in other


def test_model_shows_every_component(drawn):
    text = texts(drawn["model"])
    for part in ("embed", "MLA", "DeepSeekMoE", "dense FFN", "RMSNorm", "head", "MTP module"):
        assert part in text, f"draw_model has no {part!r}"


def test_cli_writes_the_six_pngs_and_keeps_other_files(tmp_path, capsys):
    (tmp_path / "keep.png").write_bytes(b"not ours")
    diagrams.main(["--out", str(tmp_path), "--dpi", "40"])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([f"diagram_{n}.png" for n in NAMES] + ["keep.png"])
    for name in NAMES:
        assert (tmp_path / f"diagram_{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "keep.png").read_bytes() == b"not ours"
    assert capsys.readouterr().out.count("diagram_") == 6


def test_cli_refuses_a_file_as_the_output_folder(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        diagrams.main(["--out", str(target)])
    assert exit_info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
