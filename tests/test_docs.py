"""The numbers in README.md and docs/ agree with the committed results files (scripts/render_docs.py), and the
check catches a number changed by hand. No training: only markdown and JSON are read."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RERUN = ROOT / "docs" / "results" / "fmnist_full_rerun"


def render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_docs_agree_with_their_results_files(capsys):
    rd = render_docs()
    assert rd.main(["--check"]) == 0, capsys.readouterr().out
    # the check covers the pages it is meant to (a page whose markers were lost would pass vacuously)
    for page, at_least in (("README.md", 20), ("docs/results/fashion_mnist.md", 150), ("docs/model_zoo.md", 8),
                           ("docs/results/segmentation.md", 25)):
        assert len(rd.numbers(ROOT / page, ROOT)[1]) >= at_least, page


def test_check_names_a_readme_number_changed_by_hand(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    marked = "<!--r ft:100.pretrained.mean-->88.53<!--/r-->"
    assert text.count(marked) == 1  # the 100% pretrained top-1 of the rerun, as README shows it
    readme.write_text(text.replace(marked, "<!--r ft:100.pretrained.mean-->88.35<!--/r-->"))
    line = text[:text.index(marked)].count("\n") + 1
    cmd = [sys.executable, str(ROOT / "scripts" / "render_docs.py"), "--check", str(readme), "--root", str(ROOT)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1
    bad = res.stdout.strip().splitlines()
    assert len(bad) == 1, res.stdout
    assert bad[0].startswith(f"{readme}:{line}: ft:100.pretrained.mean ")
    assert "docs/results/fmnist_full_rerun/results.json#finetune_top1.100.pretrained.mean" in bad[0]
    assert bad[0].endswith("expected 88.53, found 88.35")
    # without --check the same command writes the number back
    assert subprocess.run(cmd[:2] + cmd[3:], capture_output=True, text=True).returncode == 0
    assert readme.read_text() == text


def write(tmp_path: Path, md: str) -> Path:
    (tmp_path / "r.json").write_text(json.dumps({
        "wall": {"ft_1pct_a": 3600.0, "ft_1pct_b": 4260.0, "ft_10pct_a": 60.0, "quick": 802.4},
        "iou": {"Ankle boot": 1.234, "Bag": 50.0}, "runs": [1.0, 2.0, 4.5], "gain": -4.2849, "n": 10000}))
    (tmp_path / "log.jsonl").write_text('{"step": 10, "loss": 6.196}\n{"step": 20, "loss": 2.657}\n')
    page = tmp_path / "page.md"
    page.write_text(md)
    return page


def test_formats_wildcards_quoted_keys_and_named_expressions(tmp_path):
    rd = render_docs()
    page = write(tmp_path, "<!--r-src j = r.json-->\n<!--r-let ones = sum(j:wall.ft_1pct_*)-->\n"
                 "| <!--r ones #hmin-->?<!--/r--> | <!--r j:wall.quick #mins-->?<!--/r--> |\n"
                 "<!--r j:iou.'Ankle boot'-->?<!--/r--> <!--r j:gain #~+.2f-->?<!--/r--> "
                 "<!--r len(j:runs) #d-->?<!--/r--> <!--r mean(j:runs) #.1f-->?<!--/r--> "
                 "<!--r j:n #,d-->?<!--/r--> <!--r (j:iou.Bag - j:runs.2) / 60 * 60-->?<!--/r--> "
                 "<!--r max(j:wall.*) / 60 #.0f-->?<!--/r--> <!--r j:wall.ft_10pct_a #mins-->?<!--/r-->\n"
                 "<!--r-src log = log.jsonl--><!--r log:0.loss-->?<!--/r--> <!--r log:-1.loss-->?<!--/r-->\n")
    assert rd.main(["--check", str(page), "--root", str(tmp_path)]) == 1
    assert rd.main([str(page), "--root", str(tmp_path)]) == 0
    values = re.findall(r"-->([^<]*)<!--/r-->", page.read_text())
    assert values == ["2 h 11 min", "13 min 22 s", "1.23", "\u22124.28", "3", "2.5", "10,000", "45.50", "71",
                      "1 min 0 s", "6.20", "2.66"]
    assert rd.main(["--check", str(page), "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize("marker, message", [
    ("<!--r j:iou.Shoe-->1<!--/r-->", "r.json#iou.Shoe: no key 'Shoe' (there: Ankle boot, Bag)"),
    ("<!--r k:gain-->1<!--/r-->", "unknown source 'k'"),
    ("<!--r j:wall.x_*-->1<!--/r-->", "no key matches 'x_*'"),
    ("<!--r j:runs-->1<!--/r-->", "not a number"),
    ("<!--r gain2-->1<!--/r-->", "unknown name 'gain2'"),
    ("<!--r __import__('os')-->1<!--/r-->", "only + - * / //"),
])
def test_a_bad_marker_is_one_line_naming_file_and_line(tmp_path, capsys, marker, message):
    page = write(tmp_path, "<!--r-src j = r.json-->\n\nsee " + marker + "\n")
    assert render_docs().main(["--check", str(page), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"render_docs: error: {page}:3: ") and message in err and "\n" not in err, err


def hours_minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min"


def test_reproduce_help_and_demo_summary_give_the_measured_wall_times():
    """`beit reproduce --help` and the demo's closing lines state the committed runs' stage-time totals."""
    full = hours_minutes(sum(json.loads((RERUN / "stage_wall_time.json").read_text()).values()))
    quick = round(sum(json.loads((ROOT / "docs/results/fmnist_quick/stage_wall_time.json").read_text()).values()) / 60)
    cli = (ROOT / "beit" / "cli" / "reproduce.py").read_text()
    help_text = re.search(r'"--variant".*?help="(.*?)"\)', cli, re.S)[1]
    demo_next = re.search(r"Next: (.*)", (ROOT / "beit" / "experiments" / "fashion_mnist.py").read_text())[1]
    for text in (help_text, demo_next):
        assert f"~{quick} min" in text and f"~{full}" in text, text


def test_probe_config_headers_give_the_measured_numbers():
    res = json.loads((RERUN / "results.json").read_text())
    knn = (ROOT / "configs" / "knn" / "fmnist.yaml").read_text()
    assert f"{res['knn']['top1']:.2f}% top-1" in knn and "to be measured" not in knn
    probe = (ROOT / "configs" / "linprobe" / "fmnist.yaml").read_text()
    by_block = ", ".join(f"{v:.2f}" for v in res["linprobe"]["per_layer_top1"].values())
    assert by_block in re.sub(r"\n#\s+", " ", probe) and "to be measured" not in probe


def test_linprobe_config_states_the_recipe_a_checkpoint_is_probed_with():
    """`beit linprobe CHECKPOINT` uses the library's LINPROBE_RECIPE; the shipped config must say the same."""
    from beit.config import OptimConfig, TrainConfig, load_config
    from beit.hub import LINPROBE_RECIPE

    probe = load_config(ROOT / "configs" / "linprobe" / "fmnist.yaml")
    assert probe.optim == OptimConfig(**LINPROBE_RECIPE["optim"])
    assert probe.train.model_copy(update={"run_name": None}) == TrainConfig(**LINPROBE_RECIPE["train"])
    assert probe.data.batch_size == LINPROBE_RECIPE["batch_size"]
