"""Local model folders of each supported family, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

import rksc_sgl
from rksc_sgl.model.loading import ModelNotFoundError, UnsupportedModelError

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def _tiny_model_dir(tmp_path_factory, radix_engine, family: str):
    """A randomly initialised model of ``family`` with the packaged model's tokenizer."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=radix_engine.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=radix_engine.tokenizer.eos_token_id, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    out = tmp_path_factory.mktemp(family)
    model.save_pretrained(out)
    radix_engine.tokenizer.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_local_model_folder_matches_transformers(tmp_path_factory, radix_engine, family):
    folder, model = _tiny_model_dir(tmp_path_factory, radix_engine, family)
    with rksc_sgl.Engine(model=str(folder), cache="radix", num_threads=1, kv_pool_tokens=512) as eng:
        for prompt in ["Hello there", "A longer prompt about numbers: 1 2 3 4 5"]:
            ids = eng.encode(prompt)
            ref = model.eval().generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
            out = eng.generate_request(text=prompt, sampling_params={"max_new_tokens": 8, "min_new_tokens": 8, "temperature": 0})
            assert out["output_ids"] == ref[0, len(ids):].tolist()
        eng.check_integrity()


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local folder"):
        rksc_sgl.Engine(model=str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        rksc_sgl.Engine(model=str(tmp_path))


def test_unsupported_model_is_clear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        rksc_sgl.Engine(model=str(tmp_path))


_NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the error on a machine without CUDA")


@pytest.mark.parametrize("kwargs, message", [
    ({"cache": "lru"}, "not a known cache mode"),
    ({"kv_pool_tokens": 0}, "kv_pool_tokens must be a positive integer"),
    ({"dtype": "int8"}, "dtype"),
    pytest.param({"device": "cuda"}, "sees no CUDA GPU", marks=_NEEDS_NO_GPU),
    ({"device": "tpu"}, "device='tpu' is not supported"),
    pytest.param({"attention_backend": "flashinfer"}, "needs device='cuda'", marks=_NEEDS_NO_GPU),
])
def test_bad_engine_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rksc_sgl.EngineConfig(**kwargs)


def test_cache_modes_are_registered_specs_that_say_what_an_engine_builds():
    from rksc_sgl.config import CACHE_MODES, CACHE_SPECS, CacheSpec, register_cache

    assert tuple(CACHE_MODES) == tuple(CACHE_SPECS) == ("none", "radix", "rksc-tree")
    assert [(s.prefix_cache, s.rksc_tree) for s in CACHE_SPECS.values()] == [(False, False), (True, False),
                                                                            (True, True)]
    with pytest.raises(ValueError, match="already registered"):
        register_cache(CacheSpec("radix", prefix_cache=True, rksc_tree=False, help="again"))
    with pytest.raises(ValueError, match="ASKS needs cache='rksc-tree'"):
        rksc_sgl.EngineConfig(cache="radix", asks={"enabled": True})
    cfg = rksc_sgl.EngineConfig
    assert not cfg(cache="radix").needs_attention_stats and not cfg(cache="rksc").needs_attention_stats
    assert cfg(cache="rksc", eviction_policy="rsbcm").needs_attention_stats
    assert cfg(cache="radix", compression={"method": "rkv", "budget": 0.5}).needs_attention_stats
    assert not cfg(cache="rksc", asks={"enabled": True}).needs_slot_features
    assert cfg(cache="rksc", asks={"enabled": True, "key_layer": 4}).needs_slot_features


def test_a_cache_mode_registered_later_is_a_cache_choice(monkeypatch):
    """``CACHE_MODES`` reads the registry when asked, not when imported."""
    import argparse

    from rksc_sgl import engine_flags
    from rksc_sgl.config import CACHE_MODES, CACHE_SPECS, CacheSpec

    parser = engine_flags.add_engine_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache", "late"])
    monkeypatch.setitem(CACHE_SPECS, "late", CacheSpec("late", prefix_cache=True, rksc_tree=False, help="test"))
    assert "late" in CACHE_MODES
    assert parser.parse_args(["--cache", "late"]).cache == "late"
    assert rksc_sgl.EngineConfig(cache="late").cache_spec.name == "late"


@pytest.mark.parametrize("params, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "wrong type"),
    ({"bogus": 1}, "bogus"),
    ({"regex": r"[0-9"}, "invalid regex"),
    ({"n": 0}, "positive integer"),
    ({"n": "3"}, "positive integer"),
])
def test_bad_sampling_params(radix_engine, params, message):
    with pytest.raises(ValueError, match=message):
        radix_engine.generate_request(text="hi", sampling_params=params)
    radix_engine.check_integrity()


def test_bad_prompts(radix_engine):
    with pytest.raises(ValueError, match="empty"):
        radix_engine.generate_request(text="")
    with pytest.raises(ValueError, match="exactly one"):
        radix_engine.generate_request()
    with pytest.raises(ValueError, match="out of range"):
        radix_engine.generate_request(input_ids=[1, 2, 10**9])
    with pytest.raises(ValueError, match="context length"):
        radix_engine.generate_request(input_ids=[5] * (radix_engine.context_len + 1))
    radix_engine.check_integrity()


def test_images_rejected_on_text_model(radix_engine, use_backend, tmp_path):
    import sglang as sgl
    from PIL import Image

    picture = tmp_path / "dot.png"
    Image.new("RGB", (2, 2)).save(picture)

    @sgl.function
    def with_image(s, path):
        s += sgl.image(path) + "Describe:" + sgl.gen("d", max_tokens=2)

    use_backend(radix_engine)
    state = with_image.run(path=str(picture))
    assert "text-only" in str(state.error())
    radix_engine.check_integrity()


def test_a_bad_prompt_in_a_batch_starts_none_of_it(radix_engine):
    before = radix_engine.stats()
    with pytest.raises(ValueError, match="context length"):
        radix_engine.generate_request(input_ids=[[5, 6, 7], [5] * (radix_engine.context_len + 1)],
                                      sampling_params={"max_new_tokens": 2})
    radix_engine.check_integrity()
    assert radix_engine.stats().since(before).requests == 0


def test_parallel_sampling_n_as_sglang(radix_engine):
    """n samples per prompt, ordered as SGLang's /generate orders them (prompt-major per sample)."""
    prompts = ["Count: 1, 2,", "Colors: red,"]
    greedy = radix_engine.generate_request(text=prompts, sampling_params={"max_new_tokens": 4, "temperature": 0})
    out = radix_engine.generate_request(text=prompts, sampling_params={"max_new_tokens": 4, "temperature": 0, "n": 2})
    assert [o["text"] for o in out] == [g["text"] for g in greedy] * 2
    single = radix_engine.generate_request(text=prompts[0], sampling_params={
        "max_new_tokens": 6, "temperature": 1.0, "n": 3, "sampling_seed": 11})
    assert isinstance(single, list) and len(single) == 3
    # Sample j is seeded with seed + j: each one is reproducible on its own.
    again = radix_engine.generate_request(text=prompts[0], sampling_params={
        "max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 13})
    assert single[2]["output_ids"] == again["output_ids"]
    with pytest.raises(ValueError, match="same for every prompt"):
        radix_engine.generate_request(text=prompts, sampling_params=[{"n": 2}, {"n": 1}])
    with pytest.raises(ValueError, match="streaming"):
        radix_engine.generate_request(text=prompts[0], sampling_params={"n": 2}, stream=True)
    radix_engine.check_integrity()
