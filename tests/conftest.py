"""Shared fixtures: one engine per cache mode for the whole session (model loads once each)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.simplefilter("ignore")
torch.set_num_threads(1)

import sglang as sgl  # noqa: E402

import rksc_sgl  # noqa: E402

SMALL_POOL = 4096


def _engine(cache: str, **kwargs) -> rksc_sgl.Engine:
    return rksc_sgl.Engine(model="smollm2-135m", cache=cache, num_threads=1, **kwargs)


@pytest.fixture(scope="session")
def radix_engine():
    eng = _engine("radix", kv_pool_tokens=SMALL_POOL, max_running_requests=16)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def none_engine():
    eng = _engine("none", kv_pool_tokens=SMALL_POOL, max_running_requests=16)
    yield eng
    eng.shutdown()


@pytest.fixture()
def use_backend():
    """Install an engine as SGLang's default backend for one test, then restore."""
    from sglang.lang.global_config import global_config

    previous = global_config.default_backend if hasattr(global_config, "default_backend") else None

    def install(engine):
        sgl.set_default_backend(engine)
        return engine

    yield install
    sgl.set_default_backend(previous)


@pytest.fixture()
def checked(radix_engine):
    """The radix engine, with the integrity invariant asserted after the test."""
    yield radix_engine
    radix_engine.check_integrity()
