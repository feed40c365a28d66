"""Test session setup: a single-process world (gloo) so megatron's tensor-parallel layers work."""

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


@pytest.fixture(scope="session", autouse=True)
def single_process_world():
    from megatron_dta.parallel import ParallelLayout, shutdown

    layout = ParallelLayout.create(tp=1, device="cpu")
    yield layout
    shutdown()
