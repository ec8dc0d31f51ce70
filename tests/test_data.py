"""Data formats, bad-input errors, per-step splits, blending, tokenization and padding."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf.cli.presets import build_word_tokenizer
from rlhf.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    build_pair_dataset,
    build_prompt_dataset,
    build_sft_dataset,
    encode_prompt,
    format_prompt,
    load_examples,
    load_step_examples,
    parse_data_spec,
    parse_data_split,
    split_indices,
    step_slice,
)
from rlhf.data.synthetic import gold_score, gold_scores, make_preference_examples, make_sft_examples
from rlhf.runtime.distributed import make_dataloader


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [{"prompt": f"review: pizza {t}", "chosen": "great fun", "rejected": "bad dull"}
         for t in ("movie", "book")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


# ---- formats ---------------------------------------------------------------------------------------------------


def test_jsonl_preference(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", PAIRS))
    assert examples == [Example("review: pizza movie", "great fun", "bad dull"),
                        Example("review: pizza book", "great fun", "bad dull")]


def test_json_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(PAIRS, indent=2))
    assert [e.prompt for e in load_examples(tmp_path / "d.json")] == ["review: pizza movie", "review: pizza book"]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in PAIRS))
    assert [e.rejected for e in load_examples(path)] == ["bad dull", "bad dull"]


def test_sft_prompt_response_and_prompt_chosen(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "chosen": "d"}])
    assert load_examples(path) == [Example("a", "b", None), Example("c", "d", None)]


def test_hh_rlhf_dialogue(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"
    (example,) = load_examples(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert example.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert (example.chosen, example.rejected) == ("fine, thanks", "go away")


def msg(role, content):
    return {"role": role, "content": content}


def test_conversational_records(tmp_path):
    """TRL's conversational layouts: the answer is the last (assistant) message, the prompt the turns before it
    (or the prompt field), kept as turns for a chat template and written hh-rlhf style for other tokenizers."""
    path = write_jsonl(tmp_path / "c.jsonl", [
        # UltraFeedback-binarized style: prompt string, whole conversations as chosen/rejected
        {"prompt": "hi", "chosen": [msg("user", "hi"), msg("assistant", "hello")],
         "rejected": [msg("user", "hi"), msg("assistant", "go away")], "score_chosen": 8.0},
        # explicit prompt as messages, answers alone
        {"prompt": [msg("system", "Be brief."), msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
         "rejected": [msg("assistant", "5")]},
        # implicit prompt, several turns
        {"chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "d")],
         "rejected": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "e")]},
        # SFT
        {"messages": [msg("user", "name a fruit"), msg("assistant", "apple")]},
    ])
    first, second, third, sft = load_examples(path)
    assert (first.prompt, first.chosen, first.rejected) == ("\n\nHuman: hi\n\nAssistant:", "hello", "go away")
    assert first.messages == (("user", "hi"),) and first.fields == {"score_chosen": 8.0}
    assert second.messages == (("system", "Be brief."), ("user", "2+2?"))
    assert (second.chosen, second.rejected) == ("4", "5")
    assert second.prompt == "Be brief.\n\nHuman: 2+2?\n\nAssistant:"
    assert third.messages == (("user", "a"), ("assistant", "b"), ("user", "c"))
    assert third.prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert (sft.prompt, sft.chosen, sft.rejected, sft.messages) == (
        "\n\nHuman: name a fruit\n\nAssistant:", "apple", None, (("user", "name a fruit"),))


@pytest.mark.parametrize("record,message", [
    ({"messages": [msg("user", "q"), msg("bot", "a")]},
     "field 'messages'[1]: role 'bot', expected one of system, user, assistant"),
    ({"messages": [msg("user", "q"), msg("assistant", "a"), msg("system", "thanks")]},
     "field 'messages' must end with the assistant's answer, ends with a 'system' message"),
    ({"prompt": [msg("user", "q"), msg("assistant", "a")]},
     "field 'prompt' must end with a user message (a step-3 prompt awaiting the answer), ends with a 'assistant'"),
    ({"messages": [msg("assistant", "a")]}, "the conversation has no user message before the answer"),
    ({"chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": [msg("user", "other"), msg("assistant", "b")]},
     "fields 'chosen' and 'rejected' differ before their last message"),
    ({"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
     "field 'prompt' missing (the 'chosen' conversation holds only the answer)"),
    ({"messages": []}, "field 'messages' must be a non-empty list of messages"),
    ({"messages": [{"role": "user", "content": 3}, msg("assistant", "a")]}, "field 'messages'[0]: expected a message"),
    ({"prompt": "q", "chosen": [msg("assistant", " ")], "rejected": [msg("assistant", "b")]},
     "field 'chosen': the assistant's answer is empty"),
])
def test_conversational_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], record])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)


def test_prompt_records_are_step_3_data_with_their_fields(tmp_path):
    """A prompt without an answer (a string, or messages ending in a user turn) is a step-3 prompt; its other fields
    are the reward function's."""
    (flat, conversation, turns) = load_examples(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 6+20?", "answer": "26", "tests": [1, 2]},
        {"messages": [msg("system", "Be brief."), msg("user", "2+2?")], "answer": "4"},
        {"prompt": [msg("user", "a"), msg("assistant", "b"), msg("user", "3+3?")], "answer": "6"},
    ]))
    assert flat.is_prompt and not flat.is_pair and flat.chosen is None
    assert (flat.prompt, flat.fields, flat.where) == ("What is 6+20?", {"answer": "26", "tests": [1, 2]},
                                                      f"{tmp_path / 'p.jsonl'}:1")
    assert conversation.messages == (("system", "Be brief."), ("user", "2+2?")) and conversation.is_prompt
    assert conversation.prompt == "Be brief.\n\nHuman: 2+2?\n\nAssistant:" and conversation.fields == {"answer": "4"}
    assert turns.messages[-1] == ("user", "3+3?") and turns.fields == {"answer": "6"}


def test_a_prompt_source_goes_to_step_3_whole(tmp_path):
    """--data-split cuts pair sources only; a pair source blended with it is split as before."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"r{i}", "chosen": "c", "rejected": "r"}
                                                    for i in range(10)])
    for step in (1, 2):
        assert load_step_examples([str(prompts)], step=step, split="2,4,4") == []
    step3 = load_step_examples([str(prompts), str(pairs)], step=3, split="2,4,4", seed=5)
    assert sorted(e.prompt for e in step3 if e.is_prompt) == sorted(f"q{i}" for i in range(10))
    alone = load_step_examples([str(pairs)], step=3, split="2,4,4", seed=5)
    assert len(alone) == 4 and sorted(e.prompt for e in step3 if e.is_pair) == sorted(e.prompt for e in alone)


@pytest.mark.parametrize("records,line,message", [
    ([PAIRS[0], {"prompt": "q", "chosn": "typo", "rejected": "r"}], 2, "field 'chosen' missing"),
    ([PAIRS[0], {"prompt": "q", "answer": "1"}], 2, "field 'chosen' missing (a prompt alone in a file of records "
     "with answers; step-3 prompts go in a file of their own)"),
    ([{"prompt": "q", "answer": "1"}, {"prompt": "q", "response": "1"}], 2, "a record with an answer in a file of "
     "step-3 prompts"),
])
def test_prompts_and_answered_records_do_not_mix_in_one_file(tmp_path, records, line, message):
    path = write_jsonl(tmp_path / "m.jsonl", records)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value), str(err.value)


def test_conversational_step3_prompts_go_through_the_chat_template(tmp_path):
    templated = build_word_tokenizer()
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    (ex,) = load_examples(write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [msg("system", "be kind"), msg("user", "review: pizza")], "answer": "great"}]))
    dataset = build_prompt_dataset(templated, [ex], max_prompt_len=64)
    text = "system: be kind user: review: pizza assistant:"
    assert dataset.rows[0] == templated(text, add_special_tokens=False)["input_ids"]
    assert dataset.fields == [{"answer": "great"}] and dataset.prompts == [ex.prompt]


def test_conversational_prompts_go_through_the_chat_template(tokenizer, tmp_path):
    templated = build_word_tokenizer()
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    turns = [msg("user", "review: pizza"), msg("assistant", "great"), msg("user", "review: book")]
    (ex,) = load_examples(write_jsonl(tmp_path / "c.jsonl", [
        {"chosen": [*turns, msg("assistant", "great fun")], "rejected": [*turns, msg("assistant", "bad dull")]}]))
    text = "user: review: pizza assistant: great user: review: book assistant:"
    assert format_prompt(templated, ex.prompt, ex.messages) == text
    assert format_prompt(tokenizer, ex.prompt, ex.messages) == ex.prompt  # no template: hh-rlhf style
    pairs = build_pair_dataset(templated, [ex], max_seq_len=64)
    chosen, rejected, prompt_len = pairs.rows[0]
    assert prompt_len == len(encode_prompt(templated, ex.prompt, ex.messages))
    assert chosen[:prompt_len] == templated(text, add_special_tokens=False)["input_ids"]  # no BOS added twice


def test_conversational_sft_learns_the_last_answer_only(tmp_path):
    templated = build_word_tokenizer()
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    turns = [msg("user", "review: pizza"), msg("assistant", "bad"), msg("user", "review: book"),
             msg("assistant", "great fun")]
    (ex,) = load_examples(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}]))
    ds = build_sft_dataset(templated, [ex], max_seq_len=64)
    ids, labels = ds.rows[0]
    prompt = templated("user: review: pizza assistant: bad user: review: book assistant:",
                       add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = templated("great fun", add_special_tokens=False)["input_ids"] + [templated.eos_token_id]
    assert ids[len(prompt):] == labels[len(prompt):] == answer  # only the last turn is learned


def test_committed_hh_rlhf_sample_gives_step_3_its_64_prompts():
    """tests/data's sample of Anthropic's hh-rlhf (its README gives source and licence) reads as 64 pairs."""
    path = Path(__file__).parent / "data" / "hh_rlhf_harmless_test_64.jsonl"
    examples = load_step_examples([str(path)], step=3, split="0,0,1")
    assert len(examples) == 64 and all(e.is_pair for e in examples)
    assert all(e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:") for e in examples)


def test_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    assert [e.chosen for e in load_examples(tmp_path / "ds")] == ["great fun", "great fun"]


# ---- bad input: one line naming file, line and field ----------------------------------------------------------


def test_missing_field_names_file_line_field(tmp_path):
    records = [PAIRS[0]] * 6 + [{"prompt": "p", "rejected": "r"}]
    with pytest.raises(DataError, match=r"data\.jsonl:7: field 'chosen' missing \(expected prompt\+chosen"):
        load_examples(write_jsonl(tmp_path / "data.jsonl", records))


def test_missing_prompt(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'prompt' missing"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {"response": "x"}]))


def test_bad_json_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: bad JSON"):
        load_examples(tmp_path / "d.jsonl")


def test_bad_json_list_element_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": "a" "response": 1}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: bad JSON"):
        load_examples(tmp_path / "d.json")


def test_wrong_field_type(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'rejected' must be a string, got int"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": 3}]))


def test_empty_field(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'prompt' is empty"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": " ", "response": "b"}]))


def test_a_pair_without_prompt_or_dialogue_is_blamed_on_the_prompt(tmp_path):
    """It used to be blamed on 'chosen' ("has no '\\n\\nAssistant:' turn")."""
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'prompt' missing \(without one, 'chosen' and 'rejected' "
                       "must be hh-rlhf dialogues"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"chosen": "26", "rejected": "25", "answer": "26"}]))


def test_hh_without_assistant_turn(tmp_path):
    record = {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi"}
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'rejected' has no"):
        load_examples(write_jsonl(tmp_path / "hh.jsonl", [record]))


def test_record_not_object(tmp_path):
    (tmp_path / "d.jsonl").write_text('["a", "b"]\n')
    # A line holding a list is a JSONL record, not a JSON-list file, once it is not the first character.
    (tmp_path / "e.jsonl").write_text(json.dumps(PAIRS[0]) + "\n" + '"text"\n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: record must be a JSON object, got str"):
        load_examples(tmp_path / "e.jsonl")


def test_empty_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"d\.jsonl: file is empty"):
        load_examples(tmp_path / "d.jsonl")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")


def test_data_error_is_value_error_and_one_line(tmp_path):
    with pytest.raises(ValueError) as info:
        load_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "rejected": "r"}]))
    assert "\n" not in str(info.value)


# ---- data specs, splits and blending ---------------------------------------------------------------------------


def test_parse_data_spec():
    assert parse_data_spec("a.jsonl:2").weight == 2.0
    assert parse_data_spec("a.jsonl").weight == 1.0
    assert str(parse_data_spec("dir/b.jsonl:0.5").path) == "dir/b.jsonl"
    with pytest.raises(DataError, match=r"--data a\.jsonl:x: weight 'x' is not a number"):
        parse_data_spec("a.jsonl:x")
    with pytest.raises(DataError, match="positive"):
        parse_data_spec("a.jsonl:0")
    with pytest.raises(DataError, match="positive"):
        parse_data_spec("a.jsonl:-1")


def test_parse_data_split():
    assert parse_data_split("2,4,4") == pytest.approx((0.2, 0.4, 0.4))
    for bad in ("2,4", "a,b,c", "0,0,0", "1,-1,2"):
        with pytest.raises(DataError, match="--data-split"):
            parse_data_split(bad)


def test_split_disjoint_covering_deterministic():
    slices = split_indices(103, (0.2, 0.4, 0.4), seed=7)
    assert [len(s) for s in slices] == [21, 41, 41]
    flat = [i for s in slices for i in s]
    assert sorted(flat) == list(range(103))  # disjoint and nothing lost
    assert split_indices(103, (0.2, 0.4, 0.4), seed=7) == slices  # same on every rank
    assert split_indices(103, (0.2, 0.4, 0.4), seed=8) != slices


def test_step_slices_of_a_pair_source_and_sft_only_source():
    pairs = [Example(f"p{i}", "c", "r") for i in range(50)]
    got = [step_slice(pairs, k, (0.2, 0.4, 0.4), seed=1) for k in (1, 2, 3)]
    assert [len(g) for g in got] == [10, 20, 20]
    assert not {e.prompt for e in got[0]} & {e.prompt for e in got[1]}
    sft = [Example(f"s{i}", "c") for i in range(30)]
    assert len(step_slice(sft, 1, (0.2, 0.4, 0.4), seed=1)) == 30  # SFT-only: all of it for step 1
    assert step_slice(sft, 2, (0.2, 0.4, 0.4), seed=1) == []


def test_blending_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "c", "rejected": "r"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "c", "rejected": "r"} for i in range(40)])
    blended = load_step_examples([f"{a}:2", f"{b}:0.5"], step=2, split="0,1,1", seed=3)
    counts = Counter(e.prompt[0] for e in blended)
    assert counts == {"a": 40, "b": 10}  # 20 records each for step 2, times 2 and 0.5
    assert load_step_examples([f"{a}:2", f"{b}:0.5"], step=2, split="0,1,1", seed=3) == blended
    step3 = load_step_examples([str(a)], step=3, split="0,1,1", seed=3)
    assert not {e.prompt for e in step3} & {e.prompt for e in blended}


# ---- tokenization ----------------------------------------------------------------------------------------------


def test_default_template_and_chat_template(tokenizer):
    assert format_prompt(tokenizer, "review: pizza") == "Human: review: pizza\n\nAssistant:"
    assert format_prompt(tokenizer, "\n\nHuman: hi\n\nAssistant:") == "\n\nHuman: hi\n\nAssistant:"
    templated = build_word_tokenizer()
    templated.chat_template = "{% for m in messages %}Human: {{ m['content'] }}{% endfor %} Assistant: the"
    assert format_prompt(templated, "review: pizza") == "Human: review: pizza Assistant: the"
    ids = encode_prompt(templated, "review: pizza")
    assert templated.convert_ids_to_tokens(ids) == ["Human:", "review:", "pizza", "Assistant:", "the"]


def test_sft_right_padding_and_labels(tokenizer):
    examples = [Example("review: pizza movie", "great"), Example("review: book game", "the book was very fun")]
    ds = build_sft_dataset(tokenizer, examples, max_seq_len=64)
    batch = ds.collate([ds[0], ds[1]])
    prompt_len = len(encode_prompt(tokenizer, "review: pizza movie"))  # <s> Human: review: pizza movie Assistant:
    assert prompt_len == 6
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == (2, 6 + 5 + 1)
    assert mask[0].tolist() == [1] * 8 + [0] * 4 and mask[1].tolist() == [1] * 12
    assert ids[0, 8:].tolist() == [tokenizer.pad_token_id] * 4
    answer = [ids[0, 6].item(), tokenizer.eos_token_id]
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + answer + [IGNORE_INDEX] * 4
    assert tokenizer.decode(labels[1, 6:11]) == "the book was very fun"


def test_pair_batch_layout(tokenizer):
    ds = build_pair_dataset(tokenizer, [Example("review: pizza movie", "great fun", "bad")], max_seq_len=64)
    batch = ds.collate([ds[0]])
    assert batch["input_ids"].shape == (2, 9)  # chosen row first, rejected row second
    assert tokenizer.decode(batch["input_ids"][0, 6:8]) == "great fun"
    assert batch["attention_mask"][1].tolist() == [1] * 8 + [0]


def test_prompt_left_padding_and_drop_count(tokenizer):
    examples = [Example("review: pizza", "x", "y"), Example("review: pizza movie book", "x", "y"),
                Example("review: " + " ".join(["movie"] * 20), "x", "y")]
    ds = build_prompt_dataset(tokenizer, examples, max_prompt_len=8)
    assert ds.num_dropped == 1 and len(ds) == 2
    batch = next(iter(make_dataloader(ds, batch_size=2, shuffle=False)))
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert batch["input_ids"][:, -1].tolist() == [tokenizer.convert_tokens_to_ids("Assistant:")] * 2


def test_make_dataloader_shuffle_is_seeded(tokenizer):
    ds = build_prompt_dataset(tokenizer, [Example(f"review: {t}", "x", "y") for t in ("pizza", "movie", "book",
                                                                                     "game", "song", "park")])
    first = [b["input_ids"].tolist() for b in make_dataloader(ds, 2, shuffle=True, seed=5)]
    assert first == [b["input_ids"].tolist() for b in make_dataloader(ds, 2, shuffle=True, seed=5)]


# ---- synthetic task --------------------------------------------------------------------------------------------


def test_gold_score_rule():
    prompt = "review: pizza movie"
    assert gold_score(prompt, "great lovely fun amazing") == pytest.approx(0.75)  # net +4, no topic
    assert gold_score(prompt, "the pizza was great lovely fun amazing") == pytest.approx(1.0)
    assert gold_score(prompt, "bad awful") == pytest.approx(0.75 * (1 - 0.5) / 2)  # net -2 -> sentiment -0.5
    assert gold_score(prompt, "the book was okay") == pytest.approx(0.375)  # book is not a prompt topic
    assert gold_score(prompt, "") == 0.0 and gold_score(prompt, "okay " * 13) == 0.0
    assert gold_score(prompt, "great </s> <pad>") == pytest.approx(0.75 * 1.25 / 2)
    expected = [gold_score(prompt, "great"), gold_score(prompt, "bad")]
    assert gold_scores([prompt, prompt], ["great", "bad"]) == expected


def test_synthetic_is_deterministic_and_ranked():
    assert make_sft_examples(50, seed=3) == make_sft_examples(50, seed=3)
    assert make_sft_examples(50, seed=3) != make_sft_examples(50, seed=4)
    pairs = make_preference_examples(200, seed=1)
    assert all(gold_score(p["prompt"], p["chosen"]) > gold_score(p["prompt"], p["rejected"]) for p in pairs)
    mean = sum(gold_score(e["prompt"], e["response"]) for e in make_sft_examples(1000, seed=0)) / 1000
    assert 0.4 < mean < 0.6  # the SFT demonstrations leave PPO room to improve
