"""GenerateRequest: the one typed request every caller builds, checked without a model."""

import pytest

from rksc_sgl.engine.request_input import GenerateRequest, PromptInput, RequestError
from rksc_sgl.serving.checks import ServerLimits
from rksc_sgl.serving.errors import HTTPError


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of text or input_ids"),
    ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
    ({"text": 5}, "'text' must be a string or a non-empty list of strings"),
    ({"text": []}, "'text' must be a string or a non-empty list of strings"),
    ({"input_ids": [1, True]}, "'input_ids' must be a non-empty list"),
    ({"input_ids": [[1], "x"]}, "'input_ids' must be a non-empty list"),
    ({"text": "a", "stream": "yes"}, "'stream' must be a boolean"),
    ({"text": "a", "return_logprob": 1}, "'return_logprob' must be a boolean"),
    ({"text": "a", "top_logprobs_num": 1.5}, "'top_logprobs_num' must be an integer"),
    ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num must be >= 0"),
    ({"text": "a", "sampling_params": 3}, "'sampling_params' must be a JSON object"),
    ({"text": "a", "sampling_params": [{}]}, "one entry per prompt of a batch"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, r"one entry per prompt of a batch \(2 prompts, 1 entries\)"),
    ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 1}]}, "n must be the same for every prompt"),
    ({"text": "a", "sampling_params": {"n": 0}}, "n must be a positive integer"),
    ({"text": "a", "sampling_params": {"n": "3"}}, "n must be a positive integer"),
    ({"text": "a", "extra_key": 3}, "extra_key must be a string"),
    ({"text": ["a", "b"], "extra_key": ["k"]}, "a list of 2 strings"),
    ({"text": ["a", "b"], "stream": True}, "streaming is supported for a single prompt"),
    ({"text": "a", "sampling_params": {"n": 2}, "stream": True}, "streaming is supported for a single prompt"),
    ({"text": ["a", "b"], "stream_id": "s"}, "a stream_id request has exactly one prompt"),
])
def test_malformed_fields_are_refused_with_their_name(fields, message):
    with pytest.raises(RequestError, match=message):
        GenerateRequest(**fields)


def test_request_errors_are_value_errors():
    """Callers (and the HTTP server's 400 mapping) catch ValueError, as before."""
    assert issubclass(RequestError, ValueError)


def test_null_fields_mean_their_default():
    req = GenerateRequest(text="a", return_logprob=None, logprob_start_len=None, stream=None)
    assert (req.return_logprob, req.logprob_start_len, req.stream) == (False, -1, False)


def test_prompts_of_a_batch_pair_params_and_keys_in_order():
    req = GenerateRequest(input_ids=[[1, 2], [3]], sampling_params=[{"temperature": 0}, None],
                          extra_key=["k1", None])
    assert req.is_batch and req.prompt_count == 2 and req.n == 1
    assert req.prompts() == [PromptInput(None, [1, 2], {"temperature": 0}, "k1"),
                             PromptInput(None, [3], {}, None)]


def test_parallel_samples_follow_sglang_order_and_seeds():
    """n samples: [every prompt, sample 0], [every prompt, sample 1]; sample j seeds seed + j."""
    req = GenerateRequest(text=["a", "b"], sampling_params={"n": 2, "sampling_seed": 7, "top_p": 0.9},
                          extra_key="ns")
    got = [(p.text, p.sampling_params, p.namespace) for p in req.prompts()]
    assert got == [("a", {"sampling_seed": 7, "top_p": 0.9}, "ns"), ("b", {"sampling_seed": 7, "top_p": 0.9}, "ns"),
                   ("a", {"sampling_seed": 8, "top_p": 0.9}, "ns"), ("b", {"sampling_seed": 8, "top_p": 0.9}, "ns")]


def test_a_single_prompt_with_n_is_a_batch():
    single = GenerateRequest(text="a")
    assert not single.is_batch and len(single.prompts()) == 1
    sampled = GenerateRequest(text="a", sampling_params={"n": 3})
    assert sampled.is_batch and [p.sampling_params for p in sampled.prompts()] == [{}, {}, {}]


def test_from_body_refuses_unknown_fields_and_drops_neutral_ones():
    with pytest.raises(RequestError, match=r"unknown or unsupported request fields: \['bogus'\]"):
        GenerateRequest.from_body({"text": "a", "bogus": 1})
    with pytest.raises(RequestError, match="image_data"):
        GenerateRequest.from_body({"text": "a", "image_data": "x.png"})
    req = GenerateRequest.from_body({"text": "a", "rid": None, "image_data": [], "stream": None})
    assert req == GenerateRequest(text="a")
    with pytest.raises(RequestError, match="JSON object"):
        GenerateRequest.from_body([1])


def test_server_limits_fill_the_default_and_enforce_caps():
    limits = ServerLimits(max_new_tokens_cap=64, max_batch=4)
    req = limits.apply(GenerateRequest(text=["a", "b"], sampling_params=[None, {"max_new_tokens": 3}]))
    assert req.sampling_params == [{"max_new_tokens": 64}, {"max_new_tokens": 3}]
    with pytest.raises(HTTPError, match="over this server's cap of 64"):
        limits.apply(GenerateRequest(text="a", sampling_params={"max_new_tokens": 65}))
    with pytest.raises(HTTPError, match="batch of 5 prompts is over the limit of 4"):
        limits.apply(GenerateRequest(text=["a"] * 5))
    with pytest.raises(HTTPError, match=r"6 sequences \(prompts x n\)"):
        limits.apply(GenerateRequest(text=["a", "b"], sampling_params={"n": 3}))
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        ServerLimits(max_batch=0)
