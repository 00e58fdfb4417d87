"""The generation engine: continuous batching, per-row adapters, sampling, stopping, the batch-invariant mode."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from tests.helpers import ToyTokenizer, make_tiny_llama, tiny_lora_model

PROMPTS = ["hello there", "a", "the quick brown fox jumps", "lorem ipsum", "xyz", "0123456789", "tiny", "Q"]
ADAPTERS = ["a", "b", None, "c", {"a": 0.5, "b": 0.5}, "a", "__base__", {"b": 1.0, "c": -1.0}]


def engine(model=None, **kw) -> Engine:
    return Engine.from_model(model if model is not None else tiny_lora_model(), ToyTokenizer(), max_len=kw.pop("max_len", 96), **kw)


def hf_greedy(model, prompt: str, adapter, n: int) -> list[int]:
    ids = torch.tensor([ToyTokenizer().encode(prompt)])
    with torch.no_grad():
        if adapter in (None, "__base__"):
            with model.disable_adapter():
                out = model.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
        else:
            model.set_adapter(adapter)
            out = model.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_tokens_equal_transformers_generate_with_each_adapter() -> None:
    model = tiny_lora_model()
    eng = engine(model, max_batch=4)
    params = SamplingParams(max_tokens=10)
    outs = eng.generate(PROMPTS[:4], ADAPTERS[:4], params)
    eng.close()
    for prompt, adapter, out in zip(PROMPTS, ADAPTERS, outs):
        expected = hf_greedy(model, prompt, adapter, 10)
        assert out.token_ids == expected[: len(out.token_ids)]
        assert out.finish_reason == ("length" if len(out.token_ids) == 10 else "stop")


def test_continuous_batching_gives_each_request_its_tokens_alone() -> None:
    eng = engine(max_batch=3)  # fewer slots than requests: requests join and leave mid-run
    params = [SamplingParams(max_tokens=n) for n in (12, 3, 8, 5, 12, 2, 9, 7)]
    handles = [eng.submit(p, a, s) for p, a, s in zip(PROMPTS, ADAPTERS, params)]
    together = [h.result() for h in handles]
    alone = [eng.generate([p], [a], s)[0] for p, a, s in zip(PROMPTS, ADAPTERS, params)]
    eng.close()
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) > 4  # the adapters and prompts really differ


def test_rows_crossing_cache_blocks_keep_their_tokens_and_the_cache_shrinks_after() -> None:
    eng = engine(max_batch=3, max_len=200)  # the cache grows in 64-position blocks while rows retire and move
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (150, 4, 70, 9, 100, 3)]
    handles = [eng.submit(p, a, s) for p, a, s in zip(PROMPTS, ADAPTERS, params)]
    together = [h.result() for h in handles]
    assert eng.cache.capacity == 192  # grown for the 150-token row ("hello there" + 150 < 192)
    alone = [eng.generate([p], [a], s)[0] for p, a, s in zip(PROMPTS[:6], ADAPTERS[:6], params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    eng.generate(["x"], ["a"], SamplingParams(max_tokens=2))
    assert eng.cache.capacity == 64  # a short request alone does not attend over the long one's room
    eng.close()


def test_a_short_request_does_not_wait_for_a_long_one() -> None:
    eng = engine(max_batch=2)
    long = eng.submit("a long one", "a", SamplingParams(max_tokens=60))
    short = eng.submit("short", "b", SamplingParams(max_tokens=3))
    short_done = short.result()
    assert not long.done  # still generating when the short one has finished
    assert short_done.finished < long.result().finished
    eng.close()


def test_streamed_pieces_make_the_text_and_stop_strings_cut_it() -> None:
    eng = engine(max_batch=2)
    full = eng.generate(["hello there"], ["a"], SamplingParams(max_tokens=20))[0]
    assert len(full.text) >= 6
    stop = full.text[3:5]
    handle = eng.submit("hello there", "a", SamplingParams(max_tokens=20, stop=(stop,)))
    pieces = list(handle)
    result = handle.result()
    eng.close()
    assert "".join(pieces) == result.text == full.text[: full.text.find(stop)]
    assert result.finish_reason == "stop"


def test_sampling_is_seeded_per_request() -> None:
    eng = engine(max_batch=4)
    hot = lambda seed: SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=seed)  # noqa: E731
    first = [h.result().token_ids for h in [eng.submit("same", "a", hot(7)), eng.submit("other", "b", hot(8))]]
    again = eng.generate(["same"], ["a"], hot(7))[0].token_ids
    different = eng.generate(["same"], ["a"], hot(9))[0].token_ids
    eng.close()
    assert first[0] == again  # the same seed gives the same text, whatever else ran beside it
    assert different != again


def test_cancel_frees_the_slot() -> None:
    eng = engine(max_batch=1)
    first = eng.submit("first", "a", SamplingParams(max_tokens=80))
    second = eng.submit("second", "b", SamplingParams(max_tokens=2))
    first.cancel()
    assert first.result(timeout=30).finish_reason == "cancelled"
    assert second.result(timeout=30).finish_reason in ("length", "stop")
    eng.close()


def test_requests_that_cannot_fit_are_refused_with_one_line() -> None:
    eng = engine(max_len=32)
    with pytest.raises(LorakitError, match="context holds 32; shorten it"):
        eng.submit("x" * 40, None)
    with pytest.raises(LorakitError, match="lower max_tokens to at most 22"):
        eng.submit("x" * 10, None, SamplingParams(max_tokens=30))
    with pytest.raises(LorakitError, match="temperature must be a finite number >= 0"):
        eng.submit("x", None, SamplingParams(temperature=-1))
    with pytest.raises(LorakitError, match="no adapter named 'nope'; loaded adapters: a, b, c"):
        eng.submit("x", "nope")
    assert eng.load == (0, 0)
    eng.close()


def test_batch_invariant_mode_gives_identical_bf16_tokens_in_any_batch() -> None:
    model = tiny_lora_model(dtype=torch.bfloat16)
    eng = engine(model, max_batch=8, deterministic=True)
    params = SamplingParams(max_tokens=12)
    prompts, adapters = PROMPTS * 2, ADAPTERS * 2
    handles = [eng.submit(p, a, params) for p, a in zip(prompts, adapters)]
    together = [h.result().token_ids for h in handles]
    alone = [eng.generate([p], [a], params)[0].token_ids for p, a in zip(prompts, adapters)]
    eng.close()
    assert together == alone


def test_an_engine_on_a_plain_model_serves_the_base() -> None:
    eng = engine(make_tiny_llama(), max_batch=2)
    out = eng.generate(["abc"], [None], SamplingParams(max_tokens=4))[0]
    with pytest.raises(LorakitError, match="no adapter named 'a'; loaded adapters: none"):
        eng.submit("abc", "a")
    eng.close()
    assert out.completion_tokens >= 1


def test_registry_changes_wait_for_the_step_in_flight(tmp_path) -> None:
    model = tiny_lora_model()
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    eng = engine(model, max_batch=4)
    stepping, changed_mid_step = threading.Event(), []
    step = eng.step

    def slow_step() -> None:  # each step holds the model for 10 ms more: a change not waiting would land inside
        stepping.set()
        try:
            time.sleep(0.01)
            step()
        finally:
            stepping.clear()

    def watched(change):
        def run(*args, **kwargs):
            changed_mid_step.append(stepping.is_set())
            return change(*args, **kwargs)
        return run

    eng.step = slow_step
    lora = eng.registry.lora_model
    lora.add_adapter_files, lora.delete_adapter = watched(lora.add_adapter_files), watched(lora.delete_adapter)
    stop = threading.Event()
    driver = threading.Thread(target=eng.run_forever, args=(stop.is_set,))  # a server's stepping thread
    driver.start()
    try:
        running = eng.submit("keep going", "a", SamplingParams(max_tokens=60, ignore_eos=True))
        assert stepping.wait(10)
        eng.registry.load("b2", tmp_path / "b")  # while `running` steps
        eng.registry.unload("c")
        assert not running.done  # the changes came between its steps, not after it
        late = eng.submit("late", "b2", SamplingParams(max_tokens=5)).result(timeout=60)
        assert running.result(timeout=60).completion_tokens == 60 and late.completion_tokens >= 1
    finally:
        stop.set()
        driver.join()
    assert changed_mid_step == [False, False]


def test_prefills_run_at_a_few_padded_lengths_within_the_context() -> None:
    from lorakit.infer.engine import prefill_length

    assert [prefill_length(n) for n in (1, 2, 3, 5, 9, 16, 17, 33, 48, 49)] == [1, 2, 4, 8, 16, 16, 32, 48, 48, 64]
    eng = engine(max_batch=2, max_len=40)
    prompt = [5 + i % 50 for i in range(38)]  # padded to 48 it would pass the context: clamped to 40
    alone = eng.generate([prompt], ["a"], SamplingParams(max_tokens=1))[0]
    assert alone.finish_reason == "length" and len(alone.token_ids) == 1


def test_a_compiled_engine_meets_no_new_graph_after_warm_up_and_gives_the_eager_tokens() -> None:
    model = tiny_lora_model()
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (220, 4, 30, 9)]  # one row past 192 positions
    eager = engine(model, max_batch=3, max_len=256)
    expected = [eager.generate([p], [a], s)[0].token_ids for p, a, s in zip(PROMPTS, ADAPTERS, params)]
    compiled = engine(model, max_batch=3, max_len=256, compile=True)  # compiles its shapes here
    with torch.compiler.set_stance("fail_on_recompile"):  # a request meeting a new graph would stall for seconds
        handles = [compiled.submit(p, a, s) for p, a, s in zip(PROMPTS, ADAPTERS, params)]
        together = [h.result().token_ids for h in handles]
        alone = compiled.generate([PROMPTS[0]], [ADAPTERS[0]], params[0])[0].token_ids  # one row, many positions
    assert together == expected and alone == expected[0]


def test_a_compiled_bf16_engine_with_the_attention_kernel_meets_no_new_graph_after_warm_up() -> None:
    model = tiny_lora_model(dtype=torch.bfloat16)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (220, 4, 30, 9)]
    compiled = engine(model, max_batch=3, max_len=256, compile=True)
    assert compiled.decoder.attention_kernel is not None
    with torch.compiler.set_stance("fail_on_recompile"):
        handles = [compiled.submit(p, a, s) for p, a, s in zip(PROMPTS, ADAPTERS, params)]
        counts = [len(h.result().token_ids) for h in handles]
        alone = compiled.generate([PROMPTS[1]], [ADAPTERS[1]], params[1])[0]
    assert counts == [220, 4, 30, 9] and len(alone.token_ids) == 4


def test_loading_the_first_adapters_into_a_compiled_engine_recompiles_nothing(tmp_path) -> None:
    from tests.helpers import write_peft_adapter

    for seed, name in enumerate(("x", "y")):
        write_peft_adapter(tmp_path / name, seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    compiled = engine(make_tiny_llama().to(torch.bfloat16), max_batch=3, max_len=256, compile=True)  # trainable base
    for name in ("x", "y"):  # as `lorakit serve --adapter` does: loading freezes the base under the graphs
        compiled.registry.load(name, tmp_path / name)
    with torch.compiler.set_stance("fail_on_recompile"):
        out = compiled.generate(["hello", "abc", "xyz"], ["x", "y", None], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.completion_tokens for o in out] == [6, 6, 6]


def test_a_failed_prefill_fails_its_requests_and_the_engine_serves_the_next(monkeypatch) -> None:
    eng = engine(max_batch=2)
    prefill = eng.decoder.prefill
    calls = []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("prefill broke")
        return prefill(*args, **kwargs)

    monkeypatch.setattr(eng.decoder, "prefill", broken_once)
    first = eng.submit("hello there", "a", SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="prefill broke"):  # taken from the queue, not yet running: it must still finish
        first.result(timeout=30)
    assert eng.load == (0, 0)
    assert eng.submit("hello there", "a", SamplingParams(max_tokens=4)).result(timeout=30).completion_tokens >= 1


def test_an_engine_takes_a_registry_and_from_model_builds_one() -> None:
    from lorakit.infer.registry import AdapterRegistry

    model = tiny_lora_model()
    with pytest.raises(TypeError, match="use Engine.from_model"):
        Engine(model, ToyTokenizer())
    registry = AdapterRegistry(model, max_loaded=3)
    assert Engine(registry, ToyTokenizer(), max_len=64).registry is registry
    built = Engine.from_model(model, ToyTokenizer(), max_loras=2, max_len=64)
    assert built.registry.max_loaded == 2 and built.registry.names() == ["a", "b", "c"]
