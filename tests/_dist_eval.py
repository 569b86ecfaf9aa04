"""Run by test_distributed under torchrun (2 gloo processes): evaluation, k-NN and linear-probe features on
one process (before the group exists) and sharded over both ranks, plain and FSDP-wrapped. Writes JSON."""

import faulthandler
import json
import sys

import torch
import torch.distributed as dist

from beit.builders import build_eval_loader, build_model
from beit.config import Config
from beit.train.distributed import DistInfo, wrap_fsdp
from beit.train.evaluate import classifier_evaluate, run_over
from beit.train.knn import knn_evaluate
from beit.train.linprobe import LinearProbe

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
    return {**classifier_evaluate(cfg, torch.device("cpu"))(m), **knn_evaluate(m, cfg),
            "probe_features": feats.flatten().tolist()[:500], "labels": labels.tolist()}


single = measure(model, probe)
dist.init_process_group("gloo")
sharded = measure(model, probe)
info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
fsdp = classifier_evaluate(cfg, torch.device("cpu"))(wrap_fsdp(model, info))
fsdp.update(knn_evaluate(model, cfg))
if dist.get_rank() == 1:  # every rank returns the full result; check the rank that is not the main one
    with open(sys.argv[1], "w") as f:
        json.dump({"single": single, "sharded": sharded, "fsdp": fsdp}, f)
dist.destroy_process_group()
