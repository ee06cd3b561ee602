"""SGLang frontend features on the embedded engine: select, streaming, chat, joins, batches."""

from __future__ import annotations

import math

import pytest
import sglang as sgl
import torch


@sgl.function
def _choose(s, question):
    s += question + " Answer:"
    s += sgl.select("pick", choices=[" yes", " no", " maybe not"])


def _choice_logprob(engine, prompt: str, choice: str) -> float:
    """Reference (transformers): SGLang's runtime scores from two tokens before the
    prompt's end; the first of those has no logprob, so the mean covers the prompt's
    last token and the choice tokens."""
    p_ids = engine.encode(prompt)
    full = engine.encode(prompt + choice)
    assert full[: len(p_ids)] == p_ids
    with torch.no_grad():
        logits = engine.hf_model(torch.tensor([full])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    scores = [float(lp[i - 1, full[i]]) for i in range(len(p_ids) - 1, len(full))]
    return sum(scores) / len(scores)


def test_select_scores_like_sglang_runtime(checked, use_backend):
    use_backend(checked)
    state = _choose.run(question="Is water wet?")
    meta = state.get_meta_info("pick")
    prompt = "Is water wet? Answer:"
    expected = [_choice_logprob(checked, prompt, c) for c in [" yes", " no", " maybe not"]]
    assert meta["normalized_prompt_logprobs"] == pytest.approx(expected, abs=1e-4)
    best = [" yes", " no", " maybe not"][max(range(3), key=lambda i: expected[i])]
    assert state["pick"] == best


def test_generate_meta_info_layout(checked):
    out = checked.generate_request(
        text="One plus one is", sampling_params={"max_new_tokens": 4, "min_new_tokens": 4, "temperature": 0},
        return_logprob=True, logprob_start_len=0, top_logprobs_num=2, return_text_in_logprobs=True)
    meta = out["meta_info"]
    n_prompt = len(checked.encode("One plus one is"))
    assert meta["prompt_tokens"] == n_prompt and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert len(meta["input_token_logprobs"]) == n_prompt and meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_token_logprobs"]) == 4
    assert [t[1] for t in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    # Greedy: the chosen token is the most likely one.
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert top[0][1] == tid and math.isclose(top[0][0], lp, abs_tol=1e-5)


def test_stop_strings_trim_and_report(checked):
    out = checked.generate_request(text="List: 1, 2, 3,", sampling_params={"max_new_tokens": 20, "temperature": 0, "stop": [","]})
    assert "," not in out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ","}


def test_stream_equals_non_stream(checked):
    params = {"max_new_tokens": 12, "temperature": 0}
    full = checked.generate_request(text="The moon is", sampling_params=params)
    chunks = list(checked.generate_request(text="The moon is", sampling_params=params, stream=True))
    assert chunks[-1]["text"] == full["text"]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


@sgl.function
def _streamed(s):
    s += "Once upon a time"
    s += sgl.gen("story", max_tokens=10, temperature=0)


def test_program_streaming(checked, use_backend):
    use_backend(checked)
    state = _streamed.run(stream=True)
    pieces = "".join(state.text_iter("story"))
    assert pieces == state["story"]
    assert state.get_meta_info("story")["completion_tokens"] == 10 or state.get_meta_info("story")["finish_reason"]["type"] == "stop"


@sgl.function
def _chat(s, question):
    s += sgl.system("Be brief.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("reply", max_tokens=8, temperature=0))


def test_chat_template_from_model(checked, use_backend):
    use_backend(checked)
    state = _chat.run(question="Name a color.")
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    rendered = checked.tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert state.text().startswith(rendered)


@sgl.function
def _parallel(s, topics):
    s += "Facts:\n"
    forks = s.fork(len(topics))
    for fork, topic in zip(forks, topics):
        fork += f"- {topic}:" + sgl.gen("fact", max_tokens=6, temperature=0, stop="\n")
    forks.join(mode="concate_and_append")
    s += "Summary:" + sgl.gen("summary", max_tokens=6, temperature=0)


def test_join_concate_and_append(checked, use_backend):
    use_backend(checked)
    state = _parallel.run(topics=["cats", "dogs"])
    text = state.text()
    assert "- cats:" in text and "- dogs:" in text and "Summary:" in text
    assert text.index("- cats:") < text.index("- dogs:") < text.index("Summary:")


@sgl.function
def _qa(s, question):
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, temperature=0, stop="\n")


def test_run_batch_with_threads_matches_sequential(checked, use_backend):
    use_backend(checked)
    questions = [{"question": q} for q in ["What is 2+2?", "Capital of Italy?", "Color of grass?", "Opposite of hot?"]]
    batched = _qa.run_batch(questions, num_threads=4)
    sequential = [_qa.run(**q) for q in questions]
    assert [s["answer"] for s in batched] == [s["answer"] for s in sequential]
