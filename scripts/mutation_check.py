"""Do the tests notice when a feature breaks? Each entry of BREAKS is a one-line change to library code that
switches a feature off or gets it wrong, with the tests that must then fail.

The script copies the working tree (tracked and untracked-but-not-ignored files) to a temporary folder, never
touching the original; for each break it edits the copy's file, runs only the named tests there (with
PYTHONPATH pointing at the copy, so subprocesses and `torchrun` workers import the broken code too), and
restores the file. A break is *caught* when pytest reports failed tests (exit code 1); it is *missed* when
they pass, and *skipped* when they were skipped (e.g. Fashion-MNIST absent). First, unless `--no-baseline`,
the named tests must pass on the unbroken copy, so that a "caught" never comes from a test that fails anyway.

    .venv/bin/python scripts/mutation_check.py                 # every break (slow: minutes per break)
    .venv/bin/python scripts/mutation_check.py --list          # the breaks and their tests
    .venv/bin/python scripts/mutation_check.py --only compile-blocks-off --only sharded-eval-off

Exit code 0 when every selected break is caught, 1 otherwise (missed, skipped or not applicable), 2 on usage
errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Break:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text, found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids; at least one must fail
    why: str
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) edits of the same file, for a consistent break


BREAKS: list[Break] = [
    Break("grad-checkpointing-off", "beit/models/vit.py",
          "        if self.grad_checkpointing and self.training:", "        if False:",
          ("tests/test_models.py::test_grad_checkpointing_same_output_and_grads",),
          "activation checkpointing never runs"),
    Break("sharded-eval-off", "beit/train/evaluate.py",
          "    return rank_and_world()[1] > 1 and not isinstance(loader.dataset, IterableDataset)",
          "    return False",
          ("tests/test_distributed.py::test_sharded_evaluation_equals_one_process",),
          "every rank evaluates the whole set"),
    Break("hf-export-imagenet-stats", "beit/export.py",
          '"image_mean": list(cfg.data.mean), "image_std": list(cfg.data.std),\n        "do_reduce_labels": False,',
          '"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],\n        "do_reduce_labels": False,',
          ("tests/test_ecosystem.py::test_hf_export_loads_through_the_three_entry_points",),
          "the HF preprocessor normalises with ImageNet statistics instead of the model's"),
    Break("gray-export-not-averaged", "beit/export.py",
          "sd[key].repeat(1, 3, 1, 1) / 3  # [D, 3, p, p]", "sd[key].repeat(1, 3, 1, 1)  # [D, 3, p, p]",
          ("tests/test_ecosystem.py::test_gray_model_through_the_hf_pipeline",),
          "a gray model exported with 3 channels sums the channels instead of averaging them"),
    Break("compile-blocks-off", "beit/train/loop.py",
          "            m.compile()", "            pass",
          ("tests/test_performance.py::test_compiled_blocks_give_the_eager_outputs_and_gradients_under_bf16",),
          "train.compile=true compiles nothing"),
    Break("seg-augmentation-unseeded", "beit/data/segmentation.py",
          "np.random.default_rng([self.seed, self.epoch, int(i)])", "np.random.default_rng()",
          ("tests/test_segmentation.py::test_segment_trains_evaluates_resumes_and_draws",),
          "segmentation augmentation drawn from fresh entropy: a resumed run sees other crops"),
    Break("slide-no-average", "beit/train/segment.py",
          "            count[..., y:y + wh, x:x + ww] += 1", "            count[..., y:y + wh, x:x + ww] = 1",
          ("tests/test_segmentation.py::test_sliding_windows_cover_a_larger_image_and_average_the_overlap",),
          "sliding-window logits summed over overlapping windows instead of averaged"),
    Break("slide-misses-last-window", "beit/train/segment.py",
          "    n = max(size - crop + stride - 1, 0) // stride + 1", "    n = max(size - crop, 0) // stride + 1",
          ("tests/test_segmentation.py::test_sliding_windows_cover_a_larger_image_and_average_the_overlap",),
          "no window flush with the image's far edge when the stride does not divide it"),
    Break("ema-not-restored", "beit/train/loop.py",
          '    if run.ema is not None and state.get("ema") is not None:', "    if False:",
          ("tests/test_claims.py::test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints",),
          "--resume starts the EMA afresh from the resumed weights"),
    Break("mixing-unseeded", "beit/train/finetune.py",
          "        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))", "        pass",
          ("tests/test_claims.py::test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints",),
          "mixup/cutmix draw from numpy's global RNG, which checkpoints do not restore"),
    Break("rng-not-restored", "beit/train/loop.py",
          '    ckpt_io.set_rng_state(state["rng"])', "    pass",
          ("tests/test_claims.py::test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints",),
          "--resume does not restore the RNG states"),
    Break("eval-draws-training-rng", "beit/train/loop.py",
          "    ckpt_io.set_rng_state(rng)", "    pass",
          ("tests/test_claims.py::test_finetune_resumed_inside_an_epoch_with_other_workers_is_bit_for_bit",),
          "evaluation moves the training RNGs: a run stopped by max_steps (it evaluates there) resumes with other "
          "drop-path and mixing draws"),
    Break("augmentation-not-keyed", "beit/data/datasets.py",
          "        with keyed_global_rng(self.seed, self.epoch, i):", "        with contextlib.nullcontext():",
          ("tests/test_claims.py::test_finetune_resumed_inside_an_epoch_with_other_workers_is_bit_for_bit",
           "tests/test_claims.py::test_linprobe_resumes_bit_for_bit[augmented]"),
          "fine-tuning / probing crops drawn from the process's global RNG stream: a resumed run, or one with "
          "other data.num_workers, sees other crops"),
    Break("shard-augmentation-not-keyed", "beit/data/shards.py",
          "        with keyed_global_rng(self.seed, epoch, index):", "        if True:",
          ("tests/test_shards.py::test_shard_training_augmentation_equals_map_style_items_in_any_worker",),
          "fine-tuning from shards draws crops from each worker's RNG stream (not exact on resume)"),
    Break("tokenizer-recon-grid-originals-only", "beit/train/tokenizer.py",
          "    pairs = torch.stack([x, rec], 1)", "    pairs = torch.stack([x, x], 1)",
          ("tests/test_tokenizers.py::test_tiny_train_run_writes_loadable_tokenizer",),
          "recon.png shows each original twice instead of its reconstruction"),
    Break("tokenizer-codes-used-counts-all", "beit/train/tokenizer.py",
          '"codes_used": int((hist > 0).sum()),', '"codes_used": int((hist >= 0).sum()),',
          ("tests/test_tokenizers.py::test_tiny_train_run_writes_loadable_tokenizer",),
          "the tokenizer's metrics count unused codes as used"),
    Break("confusion-normalised-by-column", "beit/train/evaluate.py",
          "rates = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)",
          "rates = cm.float() / cm.sum(0, keepdim=True).clamp(min=1)",
          ("tests/test_finetune.py::test_eval_writes_per_class_and_confusion",),
          "confusion.png coloured by precision (columns) while it says recall per true class"),
    Break("mmpretrain-ln1-ln2-swapped", "beit/convert/layouts.py",
          r'(r"blocks\.(\d+)\.norm1\.(weight|bias)", r"backbone.layers.\1.ln1.\2"),',
          r'(r"blocks\.(\d+)\.norm1\.(weight|bias)", r"backbone.layers.\1.ln2.\2"),',
          ("tests/test_convert.py::test_mmpretrain_layout_gives_the_openmmlab_model_s_logits",),
          "OpenMMLab block norms swapped in both key tables (round trips still pass)",
          more=((r'(r"blocks\.(\d+)\.norm2\.(weight|bias)", r"backbone.layers.\1.ln2.\2"),',
                 r'(r"blocks\.(\d+)\.norm2\.(weight|bias)", r"backbone.layers.\1.ln1.\2"),'),
                (r'(r"backbone\.layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm1.\2"),',
                 r'(r"backbone\.layers\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.norm2.\2"),'),
                (r'(r"backbone\.layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm2.\2"),',
                 r'(r"backbone\.layers\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.norm1.\2"),'))),
    Break("resume-restarts-epoch", "beit/data/loader.py",
          "        sampler.position(epoch, start_batch * batch_size)", "        sampler.position(epoch, 0)",
          ("tests/test_claims.py::test_linprobe_resumes_bit_for_bit",),
          "a run resumed inside an epoch sees that epoch's first batches again"),
    Break("keep-last-ignored", "beit/train/checkpoint.py",
          "for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:", "for old in []:",
          ("tests/test_claims.py::test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints",),
          "train.keep_last prunes nothing"),
    Break("recipe-batch-warning-off", "beit/train/loop.py",
          "    if want is not None and want != global_batch and info.is_main:", "    if False:",
          ("tests/test_claims.py::test_finetune_resumes_bit_for_bit_with_mixing_and_ema_and_keeps_the_last_checkpoints",),
          "no warning when the global batch differs from optim.recipe_batch_size"),
    Break("tensorboard-off", "beit/train/metrics.py",
          "            if tensorboard:", "            if False:",
          ("tests/test_claims.py::test_tensorboard_logs_hold_the_logged_scalars",),
          "no TensorBoard event files"),
    Break("knn-every-epochs-off", "beit/train/pretrain.py",
          "    if cfg.train.knn_every_epochs:", "    if False:",
          ("tests/test_claims.py::test_knn_every_epochs_evaluates_during_pretraining",),
          "train.knn_every_epochs never runs k-NN"),
    Break("fused-adamw-off", "beit/train/loop.py",
          "    fused = not cfg.dist.fsdp_cpu_offload", "    fused = False",
          ("tests/test_performance.py::test_fused_adamw_takes_the_for_each_step",),
          "the loop builds the for-each AdamW"),
    Break("stop-flag-not-compared", "beit/train/loop.py",
          "        all_reduce_sum(flag)", "        pass",
          ("tests/test_dist_claims.py::test_a_signal_to_one_rank_stops_all_ranks_after_the_same_step_and_resumes_bitwise",),
          "under torchrun each rank stops on its own signal flag: a signalled rank leaves, its peers train on"),
    Break("fsdp-resume-drops-optimizer", "beit/train/distributed.py",
          "    if optimizer is None or optim_sd is None:", "    if True:",
          ("tests/test_dist_claims.py::test_a_ddp_run_resumes_under_fsdp",),
          "a checkpoint resumed under FSDP loads the weights but not the AdamW state (moments, step)"),
    Break("resume-refuses-strategy-change", "beit/config.py",
          '"dist.strategy", ', "",
          ("tests/test_dist_claims.py::test_a_ddp_run_resumes_under_fsdp",),
          "--resume rejects a DDP run's checkpoint under dist.strategy=fsdp"),
    Break("val-split-leaks", "beit/data/datasets.py",
          "    return SubsetDataset(ds, np.setdiff1d(np.arange(len(ds)), held))", "    return ds",
          ("tests/test_study.py::test_val_split_never_meets_training_or_test",),
          "the training split keeps the held-out validation images"),
    Break("study-selects-worst", "beit/experiments/study.py",
          'return grid, max(grid, key=lambda g: g["val"])["point"]', 'return grid, min(grid, key=lambda g: g["val"])["point"]',
          ("tests/test_study.py::test_study_runs_end_to_end_on_an_image_folder_and_resumes",),
          "beit study keeps the worst grid point of an arm"),
    Break("study-grid-reads-test", "beit/experiments/study.py",
          'f"train.eval_split={split}"', 'f"train.eval_split=test"',
          ("tests/test_study.py::test_study_runs_end_to_end_on_an_image_folder_and_resumes",),
          "the study's grid runs are scored on the test split"),
]


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (no .venv, no runs/)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():  # deleted-but-tracked files are skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, str]:
    """('passed' | 'failed' | 'skipped' | 'error', last summary line) for the named tests run in `copy`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        res = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout} s"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else res.stderr.strip()[-300:]
    if res.returncode == 1:  # name the test that failed and why, from pytest's short summary
        failed = [ln[:200] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        return "failed", "; ".join(failed) or summary
    if res.returncode == 0:
        passed = re.search(r"(\d+) passed", summary)
        return ("passed" if passed else "skipped"), summary
    return "error", f"pytest exit {res.returncode}: {summary}"


def check_import(copy: Path) -> None:
    """The copy's `beit` is the one imported (not the editable install pointing at the original tree)."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    got = subprocess.run([sys.executable, "-c", "import beit; print(beit.__file__)"], cwd=copy, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(got).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"mutation_check: `import beit` in the copy loads {got}, not the copy; cannot check")


def apply(copy: Path, b: Break) -> str | None:
    """Edit the copy's file; returns the original text, or None when the break no longer applies."""
    path = copy / b.file
    text = broken = path.read_text()
    for old, new in ((b.old, b.new), *b.more):
        if broken.count(old) != 1:
            return None
        broken = broken.replace(old, new)
    path.write_text(broken)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the breaks and their tests, run nothing")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this break (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip checking that the named tests pass unbroken")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)
    names = {b.name for b in BREAKS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        print(f"mutation_check: unknown break {', '.join(unknown)}; --list shows the names", file=sys.stderr)
        return 2
    chosen = [b for b in BREAKS if not args.only or b.name in args.only]
    if args.list:
        for b in chosen:
            print(f"{b.name}: {b.why}\n  {b.file}: {b.old.strip()!r} -> {b.new.strip()!r}")
            for t in b.tests:
                print(f"  must fail: {t}")
        return 0

    with tempfile.TemporaryDirectory(prefix="beit-mutation-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_import(copy)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for b in chosen for t in b.tests))
            t0 = time.time()
            status, summary = run_tests(copy, tests, args.timeout)
            print(f"baseline ({time.time() - t0:.0f} s): {summary}", flush=True)
            if status != "passed":
                print("mutation_check: the named tests do not pass on the unbroken tree; fix that first",
                      file=sys.stderr)
                return 1
        results = []
        for b in chosen:
            original = apply(copy, b)
            if original is None:
                results.append((b, "not applicable", f"{b.file} no longer has the line exactly once"))
            else:
                t0 = time.time()
                try:
                    status, summary = run_tests(copy, b.tests, args.timeout)
                finally:
                    (copy / b.file).write_text(original)
                verdict = {"failed": "caught", "passed": "MISSED", "skipped": "skipped"}.get(status, "error")
                results.append((b, verdict, f"{summary} ({time.time() - t0:.0f} s)"))
            print(f"{results[-1][1]:>14}  {b.name}: {results[-1][2]}", flush=True)
    bad = [r for r in results if r[1] != "caught"]
    print(f"\n{len(results) - len(bad)}/{len(results)} breaks caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
