"""Run by test_distributed under torchrun (2 gloo processes): evaluation, k-NN and linear-probe features on
one process (before the group exists) and sharded over both ranks, plain and FSDP-wrapped. Writes JSON."""

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist

from beit.builders import build_eval_loader, build_model
from beit.config import Config
from beit.train.distributed import DistInfo, wrap_fsdp
from beit.train.evaluate import classifier_evaluate, run_over
from beit.train.knn import knn_evaluate
from beit.train.linprobe import LinearProbe
from beit.data.segmentation import build_seg_dataset
from beit.train.segment import build_eval_loader as seg_eval_loader
from beit.train.segment import build_segmenter, evaluate_segmenter

torch.set_num_threads(1)
faulthandler.dump_traceback_later(240, exit=True)  # a collective mismatch fails the test instead of hanging
# 21 test images in batches of 10: rank 0 gets 11 (2 batches), rank 1 gets 10 (1 batch).
cfg = Config.model_validate({
    "model": {"name": "beit_fmnist_patch4_32", "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10},
    "data": {"dataset": "fashion_mnist", "img_size": 32, "in_chans": 1, "mean": [0.286], "std": [0.353],
             "batch_size": 5, "num_workers": 0, "train_subset": 30, "eval_subset": 21},
    "train": {"device": "cpu", "amp": "none", "progress": False, "knn_k": 5},
})
torch.manual_seed(0)
model = build_model(cfg).eval()
torch.nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero: give the logits a ranking
probe = LinearProbe(build_model(cfg), 10)


def measure(m, p):
    feats, labels = run_over(build_eval_loader(cfg, "test"), p.features, torch.device("cpu"), "none")
    seen = []  # batch sizes this rank's model forwarded during the classifier evaluation: its share, observed
    hook = m.register_forward_pre_hook(lambda mod, args: seen.append(len(args[0])))
    try:
        res = classifier_evaluate(cfg, torch.device("cpu"))(m)
    finally:
        hook.remove()
    return {**res, **knn_evaluate(m, cfg), "probe_features": feats.flatten().tolist()[:500],
            "labels": labels.tolist(), "batches": gather(seen)}


def gather(obj):
    """Every rank's `obj`, in rank order (just [obj] before the process group exists)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# segmentation: 5 test scenes in batches of 2 -> rank 0 scores 3 (2 batches), rank 1 scores 2 (1 batch + 1 repeat)
seg_cfg = Config.model_validate({
    "model": {"name": "beit_fmnist_patch4_64_upernet", "embed_dim": 32, "num_heads": 2},
    "data": {"dataset": "fmnist_scenes", "img_size": 64, "in_chans": 1, "mean": [0.286], "std": [0.353],
             "num_workers": 0},
    "seg": {"scenes": [4, 5], "scale": [256, 64], "eval_batch_size": 2, "eval_mode": "slide"},
    "train": {"device": "cpu", "amp": "none", "progress": False},
})
seg_test = build_seg_dataset(seg_cfg, "test")
segmenter = build_segmenter(seg_cfg, len(seg_test.classes)).eval()
with torch.no_grad():  # BatchNorm statistics of real features, so that the random model's predictions vary
    segmenter.train()(seg_test[0][0][None].repeat(2, 1, 1, 1))
    segmenter.eval()


def measure_seg():
    metrics, _ = evaluate_segmenter(segmenter, seg_eval_loader(seg_cfg, seg_test), seg_cfg, torch.device("cpu"),
                                    list(seg_test.classes))
    return metrics


single = measure(model, probe)
single["seg"] = measure_seg()
dist.init_process_group("gloo")
sharded = measure(model, probe)
sharded["seg"] = measure_seg()
info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
fsdp = classifier_evaluate(cfg, torch.device("cpu"))(wrap_fsdp(model, info))
fsdp.update(knn_evaluate(model, cfg))
if dist.get_rank() == 1:  # every rank returns the full result; check the rank that is not the main one
    with open(sys.argv[1], "w") as f:
        json.dump({"single": single, "sharded": sharded, "fsdp": fsdp}, f)
dist.barrier()  # both ranks are done with every collective before either tears the group down
dist.destroy_process_group()
# Exit without interpreter teardown: in about one full-suite run in three, a rank aborted in C++ destructors
# at exit ("terminate called without an active exception") after every result was written and compared.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
