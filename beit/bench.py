"""Training-step throughput: ours against HF transformers and timm, timed alternately in one process.

    beit bench                                  # the three standard rows (below), bf16, auto device
    beit bench --row fmnist-mim --repeats 7 --json bench.json
    beit bench --preset beit_base_patch16_224_8k_vocab --batch 64
    beit bench --loop 60                        # + the real Fashion-MNIST pretraining loop for 60 steps
    beit bench --row fmnist-mim --compile-scopes   # our step eager, per-block, whole-model, whole-step compiled
    beit bench --row none --data-items 2000     # CPU ms per Fashion-MNIST pretraining item (the data alone)

A *step* is what one iteration of training costs without data loading: forward, backward and AdamW on
random input of the real shapes. The pretraining step includes the frozen tokenizer (its targets are
part of the work); the HF step gets the same tokenizer, so only the ViT differs. Every implementation is
timed in the same process, round-robin (`repeats` rounds of `iters` steps each), and the median round is
reported, so machine noise hits all of them alike.

FLOPs per step are counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention; forward + backward). MFU-style shares divide the achieved FLOP/s by a bf16 matmul peak
measured in the same run and, on GPUs with a known spec sheet, by the dense peak stated there.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity
from torch.utils.flop_counter import FlopCounterMode

from beit import builders
from beit.builders import create_tokenizer
from beit.config import load_config
from beit.models import PRESETS, Beit, create_model
from beit.tokenizers import DalleTokenizer
from beit.tokenizers.dalle import DalleEncoder
from beit.train.distributed import DistInfo
from beit.train.finetune import make_classification_step
from beit.train.loop import autocast, compile_blocks, fit
from beit.train.pretrain import build_pretrain_task, make_mim_step

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity).
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "A100": 312.0}


@dataclass
class Step:
    """One timed unit of work. `fn` runs it once; `batch` images per call."""

    name: str
    fn: Callable[[], object]
    batch: int
    flops: float | None = None  # per call, counted
    peak_mem_gb: float | None = None  # this step's own memory (params, grads, optimizer, activations)
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device, dtype=torch.bfloat16, seconds: float = 2.0) -> float:
    """Best achieved TFLOP/s of a large square matmul on this device (the machine's practical ceiling)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def spec_peak_tflops(device: torch.device) -> tuple[float | None, str | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, tflops in SPEC_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"{key} bf16 dense (spec sheet)"
    return None, None


def prepare(build: Callable[[], Step], device: torch.device, warmup: int) -> Step:
    """Build a step, count its FLOPs (one call) and warm it up. On CUDA, record its own peak memory: its
    parameters, gradients, optimizer state and activations (whatever was allocated before is excluded)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = build()
    if step.flops is None:
        step.flops = count_flops(step.fn)
    for _ in range(warmup):
        step.fn()
    sync(device)
    if device.type == "cuda":
        step.peak_mem_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return step


def time_alternating(steps: list[Step], device: torch.device, iters: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each step over `repeats` round-robin rounds of `iters` calls."""
    rounds: dict[str, list[float]] = {s.name: [] for s in steps}
    for _ in range(repeats):
        for s in steps:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                s.fn()
            sync(device)
            rounds[s.name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(v) for name, v in rounds.items()}


# ------------------------------------------------------------------------------------- step builders
def build_tokenizer(name: str, device: torch.device):
    """'dall-e-random': the DALL-E encoder architecture with PyTorch's default random init (no weights
    needed: the cost is the same); anything else goes to `create_tokenizer` (e.g. 'fmnist_dvae')."""
    if name == "dall-e-random":
        return DalleTokenizer(DalleEncoder().state_dict(), source="random init").to(device)
    return create_tokenizer(name).to(device)


def default_tokenizer(preset: str) -> str:
    return "fmnist_dvae" if "fmnist" in preset else "dall-e-random"


def preset_kwargs(preset: str, **overrides) -> dict:
    """The preset's full constructor arguments: `Beit` defaults, then the preset, then overrides."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    defaults = {k: p.default for k, p in inspect.signature(Beit).parameters.items()}
    return {**defaults, **PRESETS[preset], **overrides}


def mim_batch(kw: dict, tokenizer, batch: int, device: torch.device, mask_ratio: float = 0.4) -> dict:
    """Random input of the real shapes: patch view, tokenizer view in [0, 1], a mask of fixed size."""
    grid = kw["img_size"] // kw["patch_size"]
    n = grid * grid
    tok_size = grid * tokenizer.downsample
    order = torch.rand(batch, n, device=device).argsort(1)
    mask = order < round(mask_ratio * n)  # [B, N], exactly round(0.4 N) masked per image
    return {"image": torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=device),
            "tok_image": torch.rand(batch, tokenizer.in_chans, tok_size, tok_size, device=device),
            "mask": mask.view(batch, grid, grid)}


def train_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device, amp: str) -> Callable:
    """forward (under the loop's autocast) + backward + AdamW, with the fp16 loss scaler when amp=fp16."""
    # fused, as the training loop's optimizer: the same for every implementation, so the ratio is the model's
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    model.train()

    def step():
        with autocast(device, amp):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def ours_mim(preset: str, batch: int, device, amp: str, tokenizer, compile: bool = False,
             wrap: Callable[[nn.Module], nn.Module] | None = None, **overrides) -> Step:
    model = create_model(preset, **overrides).to(device)
    data = mim_batch(preset_kwargs(preset, **overrides), tokenizer, batch, device)
    mim = make_mim_step(tokenizer)
    if wrap is not None:
        model = wrap(model)
    return ours_step(model, lambda: mim(model, data)["loss"], batch, device, amp, compile)


def ours_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], batch: int, device, amp: str,
              compile: bool) -> Step:
    flops = None
    if compile:  # count on the eager model (the counter does not see inside compiled graphs)
        flops = count_flops(train_step(model, loss_fn, device, amp))
        compile_blocks(model)  # as train.compile=true does
    return Step("ours", train_step(model, loss_fn, device, amp), batch, flops=flops)


def tokenizer_only(tokenizer, data: dict) -> Callable:
    return lambda: tokenizer.encode(data["tok_image"].float())


def hf_config(preset: str, **overrides):
    import transformers

    kw = preset_kwargs(preset, **overrides)
    return transformers.BeitConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=kw["in_chans"],
        hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=int(kw["embed_dim"] * kw["mlp_ratio"]), layer_norm_eps=kw["layer_norm_eps"],
        layer_scale_init_value=kw["init_values"], drop_path_rate=kw.get("drop_path_rate", 0.0),
        use_mask_token=bool(kw.get("use_mask_token")), vocab_size=kw.get("vocab_size") or 8192,
        use_relative_position_bias=bool(kw.get("use_rel_pos_bias")),
        use_shared_relative_position_bias=bool(kw.get("use_shared_rel_pos_bias")),
        use_absolute_position_embeddings=bool(kw.get("use_abs_pos_emb")),
        use_mean_pooling=bool(kw.get("use_mean_pooling")), num_labels=max(kw.get("num_classes", 0), 1))


def hf_mim(preset: str, batch: int, device, amp: str, tokenizer, **overrides) -> Step:
    """HF `BeitForMaskedImageModeling` (its own loss on masked positions) + our tokenizer, same input."""
    import transformers

    model = transformers.BeitForMaskedImageModeling(hf_config(preset, **overrides)).to(device)
    data = mim_batch(preset_kwargs(preset, **overrides), tokenizer, batch, device)

    def loss():
        mask = data["mask"].flatten(1)  # [B, N]
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            tokens = tokenizer.encode(data["tok_image"].float()).flatten(1)  # [B, N]
        labels = tokens[mask].clone()  # [num_masked]
        return model(pixel_values=data["image"], bool_masked_pos=mask, labels=labels).loss

    return Step("hf", train_step(model, loss, device, amp), batch,
                info={"attn_implementation": model.config._attn_implementation})


def ft_batch(kw: dict, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=device),
            torch.randint(0, kw["num_classes"], (batch,), device=device))


def ours_ft(preset: str, batch: int, device, amp: str, compile: bool = False, **overrides) -> Step:
    model = create_model(preset, **overrides).to(device)
    data = ft_batch(preset_kwargs(preset, **overrides), batch, device)
    cls = make_classification_step(None, 0.0)  # plain cross-entropy, as timm's step below
    return ours_step(model, lambda: cls(model, data)["loss"], batch, device, amp, compile)


def timm_ft(preset: str, batch: int, device, amp: str, **overrides) -> Step:
    from timm.models.beit import Beit as TimmBeit

    kw = preset_kwargs(preset, **overrides)
    model = TimmBeit(img_size=kw["img_size"], patch_size=kw["patch_size"], in_chans=kw["in_chans"],
                     num_classes=kw["num_classes"], embed_dim=kw["embed_dim"], depth=kw["depth"],
                     num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"], drop_path_rate=kw["drop_path_rate"],
                     init_values=kw["init_values"], use_abs_pos_emb=bool(kw.get("use_abs_pos_emb")),
                     use_rel_pos_bias=bool(kw.get("use_rel_pos_bias")),
                     norm_layer=partial(nn.LayerNorm, eps=kw["layer_norm_eps"])).to(device)
    x, y = ft_batch(kw, batch, device)
    return Step("timm", train_step(model, lambda: F.cross_entropy(model(x).float(), y), device, amp), batch)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------- a row
def profile_table(fn: Callable[[], object], device: torch.device, iters: int, rows: int = 12) -> str:
    """torch.profiler over `iters` calls: the operators that take the most time, as its table."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench_row(preset: str, batch: int, device: torch.device, amp: str = "bf16", *, baselines: bool = True,
              tokenizer: str | None = None, compile: bool = False, warmup: int = 2, iters: int = 5,
              repeats: int = 5, peak: float | None = None, profile: bool = False, **overrides) -> list[dict]:
    """Time ours (and HF or timm when installed) on one preset; one result dict per implementation."""
    kw = preset_kwargs(preset, **overrides)
    mim = bool(kw.get("vocab_size"))
    builders, tok = [], None
    if mim:
        tok = build_tokenizer(tokenizer or default_tokenizer(preset), device)
        if tok.vocab_size != kw["vocab_size"]:
            raise ValueError(f"tokenizer vocab {tok.vocab_size} != {preset} vocab_size {kw['vocab_size']}")
        builders.append(lambda: ours_mim(preset, batch, device, amp, tok, compile=compile, **overrides))
        if baselines and has_module("transformers"):
            builders.append(lambda: hf_mim(preset, batch, device, amp, tok, **overrides))
        builders.append(lambda: Step("tokenizer", tokenizer_only(tok, mim_batch(kw, tok, batch, device)), batch))
    else:
        builders.append(lambda: ours_ft(preset, batch, device, amp, compile=compile, **overrides))
        if baselines:
            builders.append(lambda: timm_ft(preset, batch, device, amp, **overrides))
    steps = [prepare(b, device, warmup) for b in builders]
    times = time_alternating(steps, device, iters, repeats)
    if profile:  # where our step's time goes
        print(profile_table(steps[0].fn, device, iters), flush=True)
    spec, spec_name = spec_peak_tflops(device)
    ours_t = times["ours"]
    out = []
    for s in steps:
        t = times[s.name]
        tflops = s.flops / t / 1e12 if s.flops else None
        out.append({
            "preset": preset, "batch": batch, "amp": amp, "device": device_name(device), "impl": s.name,
            "compile": compile and s.name == "ours", "ms_per_step": t * 1e3, "img_per_s": s.batch / t,
            "ours_speedup": t / ours_t if s.name not in ("ours", "tokenizer") else None,
            "gflop_per_img": s.flops / s.batch / 1e9 if s.flops else None,
            "tflops": tflops, "share_of_matmul_peak": tflops / peak if tflops and peak else None,
            "mfu_spec": tflops / spec if tflops and spec else None, "spec_peak": spec_name,
            "tokenizer_share": times["tokenizer"] / t if tok is not None and s.name != "tokenizer" else None,
            "peak_mem_gb": s.peak_mem_gb, "repeats": repeats, "iters": iters, **s.info,
        })
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def fmt(v, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v * scale, spec)


HEADER = (f"{'row':<34} {'impl':<12} {'img/s':>8} {'ours x':>6} {'GFLOP/img':>9} {'TFLOP/s':>8} "
          f"{'%mm-peak':>8} {'%spec':>6} {'tok%':>5} {'mem GB':>7}")


def format_result(label: str, r: dict) -> str:
    return (f"{label[:34]:<34} {r['impl']:<12} {r['img_per_s']:>8.1f} {fmt(r['ours_speedup'], '.2f'):>6} "
            f"{fmt(r['gflop_per_img'], '.2f'):>9} {fmt(r['tflops'], '.2f'):>8} "
            f"{fmt(r['share_of_matmul_peak'], '.1f', 100):>8} {fmt(r['mfu_spec'], '.1f', 100):>6} "
            f"{fmt(r['tokenizer_share'], '.0f', 100):>5} {fmt(r['peak_mem_gb'], '.2f'):>7}")


# -------------------------------------------------------------------------------------- real loop
class _TimeUp(Exception):
    pass


def run_loop(config: str, device: torch.device, steps: int | None = None, seconds: float | None = None,
             skip: int = 3, overrides: list[str] | None = None) -> dict:
    """Run the real training loop (`fit`, data pipeline included, no run directory) for `steps` timed steps
    or `seconds`, and return its steady-state img/s, measured between step calls after `skip` warm-up steps."""
    cfg = load_config(config, ["train.progress=false", "train.knn_every_epochs=null", "train.ema_decay=null",
                               *(overrides or [])])
    task = build_pretrain_task(cfg, device)
    inner, stamps = task.step, []

    def timed_step(model, batch):
        sync(device)
        stamps.append(time.perf_counter())  # the clock starts after `skip` steps, past the loop's setup
        timed = len(stamps) - 1 - skip
        if timed > 0 and ((steps and timed >= steps) or (seconds and stamps[-1] - stamps[skip] > seconds)):
            raise _TimeUp
        return inner(model, batch)

    task.step = timed_step
    try:
        fit(cfg, task, None, DistInfo(device=device))
    except _TimeUp:
        pass
    n = len(stamps) - 1 - skip
    if n < 1:
        raise RuntimeError(f"the loop ran {len(stamps) - 1} steps, too few to time after {skip} warm-up steps")
    img_s = n * cfg.data.batch_size / (stamps[-1] - stamps[skip])
    return {"config": config, "preset": cfg.model.name, "batch": cfg.data.batch_size, "steps_timed": n,
            "num_workers": cfg.data.num_workers, "loop_img_per_s": img_s}


def loop_vs_step(config: str, device: torch.device, steps: int, rounds: int, compile: bool = False, amp: str = "bf16",
                 warmup: int = 2, overrides: list[str] | None = None) -> dict:
    """The real loop against the synthetic step of the same model, batch and tokenizer, in `rounds` alternating
    rounds of `steps` loop steps then `steps` synthetic steps: the median of the rounds' loop/step ratios, so that
    a machine whose speed drifts over minutes hits both sides of every ratio alike."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"--loop needs at least 1 step and --loop-rounds at least 1 round, got {steps} and {rounds}")
    overrides = [f"train.compile={str(compile).lower()}", f"train.amp={amp}", *(overrides or [])]
    cfg = load_config(config, overrides)
    tok = builders.build_tokenizer(cfg, device)
    step = prepare(lambda: ours_mim(cfg.model.name, cfg.data.batch_size, device, amp, tok, compile=compile), device,
                   warmup)
    loops, step_rates = [], []
    for _ in range(rounds):
        loop = run_loop(config, device, steps=steps, overrides=overrides)
        loops.append(loop["loop_img_per_s"])
        step_rates.append(step.batch / time_alternating([step], device, steps, 1)[step.name])
    ratios = [lp / st for lp, st in zip(loops, step_rates)]
    return {**loop, "rounds": rounds, "loop_img_per_s": statistics.median(loops),
            "step_img_per_s": statistics.median(step_rates), "loop_over_step": statistics.median(ratios),
            "rounds_loop_img_per_s": loops, "rounds_step_img_per_s": step_rates}


# ---------------------------------------------------------------------------------- compile scopes
COMPILE_SCOPES = ("eager", "blocks", "model", "step")


def scope_step(scope: str, preset: str, batch: int, device: torch.device, amp: str, tokenizer) -> Step:
    """Our pretraining step with torch.compile over `scope`: nothing (eager), each block (what
    train.compile=true does), the whole model (`model.compile()`: the masked-token gather splits it into
    graphs of data-dependent shape), or the tokenizer, model and loss as one compiled function (step)."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope '{scope}'; choose from {', '.join(COMPILE_SCOPES)}")
    torch.manual_seed(0)  # every scope trains the same initial weights
    model = create_model(preset).to(device)
    data = mim_batch(preset_kwargs(preset), tokenizer, batch, device)
    mim = make_mim_step(tokenizer)

    def loss():
        return mim(model, data)["loss"]

    if scope == "blocks":
        compile_blocks(model)
    elif scope == "model":
        model.compile()
    elif scope == "step":
        loss = torch.compile(loss)
    # flops=0: not counted (the counter does not see inside compiled graphs, and would trigger compilation)
    return Step(scope, train_step(model, loss, device, amp), batch, flops=0.0)


def compile_scope_rows(preset: str, batch: int, device: torch.device, amp: str = "bf16", *,
                       scopes: tuple[str, ...] = COMPILE_SCOPES, tokenizer: str | None = None, warmup: int = 3,
                       iters: int = 3, repeats: int = 9) -> list[dict]:
    """Time our pretraining step under each compile scope, alternating as `bench_row` does; one result per
    scope with its speed over the first scope's and its build time (compilation and warm-up included)."""
    if not preset_kwargs(preset).get("vocab_size"):
        raise ValueError(f"compile scopes time the pretraining step: '{preset}' has no vocab_size; "
                         f"use a *_vocab preset or the fmnist-mim / vitb-mim row")
    tok = build_tokenizer(tokenizer or default_tokenizer(preset), device)
    steps, build_s = [], {}
    for scope in scopes:
        t0 = time.perf_counter()
        steps.append(prepare(partial(scope_step, scope, preset, batch, device, amp, tok), device, warmup))
        build_s[scope] = time.perf_counter() - t0
    times = time_alternating(steps, device, iters, repeats)
    first = times[scopes[0]]
    return [{"preset": preset, "batch": batch, "amp": amp, "device": device_name(device), "impl": f"compile {s}",
             "scope": s, "ms_per_step": times[s] * 1e3, "img_per_s": batch / times[s],
             "speedup_over_first": first / times[s], "build_s": build_s[s], "peak_mem_gb": st.peak_mem_gb,
             "repeats": repeats, "iters": iters} for s, st in zip(scopes, steps)]


def format_scope(label: str, r: dict, first: str) -> str:
    return (f"{label[:34]:<34} {r['impl']:<14} {r['img_per_s']:>8.1f} img/s  {r['speedup_over_first']:.3f}x {first}"
            f"  built in {r['build_s']:.1f} s")


# ------------------------------------------------------------------------------------ data pipeline
def data_item_cost(config: str, items: int, overrides: list[str] | None = None, warm: int = 100) -> dict:
    """CPU milliseconds per pretraining item of `config` (`dataset[i]`: decode, two views, block mask; no
    loader around it), by process CPU time, which other processes on the machine disturb less than wall time."""
    if items < 1:
        raise ValueError(f"--data-items needs at least 1 item, got {items}")
    cfg = load_config(config, overrides or [])
    # the tokenizer alone gives the mask grid: the model (and its model.pretrained) is not built
    grid = cfg.tokenizer.image_size // builders.build_tokenizer(cfg).downsample
    ds = builders.build_mim_dataset(cfg, (grid, grid))
    for i in range(warm):  # warm the caches and lazy imports
        ds[i % len(ds)]
    t = time.process_time()
    for i in range(items):
        ds[i % len(ds)]
    return {"config": str(config), "items": items, "cpu_ms_per_item": (time.process_time() - t) / items * 1e3}
