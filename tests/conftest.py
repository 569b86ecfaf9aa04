import os

import pytest
import torch

# The suite runs many small models on a 2-core machine, often beside DataLoader workers or subprocesses:
# more than one intra-op thread per process oversubscribes the cores and is many times slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after (for files that opt in with `usefixtures`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_stage_runner(tmp_path, monkeypatch):
    """`beit reproduce` stages without training: `fake_stage_runner(finish)` makes every stage create its run
    directory `tmp_path / run_name` and call `finish(command, cfg, run_dir)` to leave the files a finished stage
    leaves. Returns the list of run names called, in order (it keeps growing across reruns)."""
    import beit.experiments.fashion_mnist as rep

    calls: list[str] = []

    def install(finish):
        def runner(command):
            def run(cfg, resume, overwrite):
                calls.append(cfg.train.run_name)
                d = tmp_path / cfg.train.run_name
                d.mkdir(parents=True, exist_ok=True)
                finish(command, cfg, d)

            return run

        monkeypatch.setattr(rep, "_runner", runner)
        return calls

    return install


# One rule for tests that read Fashion-MNIST: mark them `@pytest.mark.fmnist` (or `pytestmark = ...` for a whole
# file); they skip, saying how to install it, when the Debian package's files are absent.
FMNIST = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


def has_fmnist() -> bool:
    return all(os.path.isfile(os.path.join(FMNIST, f)) for f in FMNIST_FILES)


def pytest_configure(config):
    config.addinivalue_line("markers", "fmnist: needs Fashion-MNIST in " + FMNIST + " (skipped when absent)")


def pytest_collection_modifyitems(config, items):
    if has_fmnist():
        return
    skip = pytest.mark.skip(reason=f"Fashion-MNIST not found in {FMNIST}: `apt-get install dataset-fashion-mnist` "
                                   "(or `make data` as root)")
    for item in items:
        if item.get_closest_marker("fmnist"):
            item.add_marker(skip)
