"""Scoring adapters and the base by greedy generation and exact match."""

from __future__ import annotations


from lorakit.data.formats import parse_record
from lorakit.data.templates import get_template
from lorakit.data.tokenize import eval_prompt
from lorakit.infer.scoring import exact_match, generate_answers, score_samples
from tests.helpers import ToyTokenizer, make_tiny_gpt2, tiny_lora_model


def samples(outputs: list[str]):
    return [parse_record({"instruction": f"task {i}", "input": "", "output": out}, f"t.jsonl:{i + 1}", "alpaca")
            for i, out in enumerate(outputs)]


def test_scores_count_the_exact_answers_per_adapter() -> None:
    model, tok = tiny_lora_model(), ToyTokenizer()
    probe = samples(["?"] * 4)
    prompts = [eval_prompt(s, tok, get_template("alpaca", tok)).prompt_ids for s in probe]
    answers_a = generate_answers(model, tok, prompts, ["a"] * 4, max_new_tokens=6)
    answers_base = generate_answers(model, tok, prompts, ["__base__"] * 4, max_new_tokens=6)
    assert answers_a != answers_base
    # references: adapter a's own answers for the first three records, something else for the last
    records = samples(answers_a[:3] + ["never said"])
    base, a = score_samples(model, tok, records, {"base": "__base__", "a": "a"}, "alpaca", max_new_tokens=6)
    assert a.exact_match == 0.75
    assert base.exact_match == sum(exact_match(x, y) for x, y in zip(answers_base, answers_a[:3] + ["never said"])) / 4
    assert [p["correct"] for p in a.predictions] == [True, True, True, False]
    assert a.predictions[0]["where"] == "t.jsonl:1" and a.predictions[3]["reference"] == "never said"


def test_models_the_engine_cannot_run_use_transformers_generate() -> None:
    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    prompts = [[5, 6, 7], [8, 9]]
    answers = generate_answers(model.eval(), ToyTokenizer(), prompts, ["default", "__base__"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.training is False


def test_exact_match_ignores_surrounding_whitespace_only() -> None:
    assert exact_match(' {"a":1}\n', '{"a":1}')
    assert not exact_match('{"a": 1}', '{"a":1}')
