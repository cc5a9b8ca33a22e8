"""Tests of loramix.data: sources, task set, splits, templates, collators and samplers."""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from loramix import assets
from loramix.data import (
    IGNORE_INDEX,
    ClassificationTemplate,
    DataError,
    Example,
    GenerationTemplate,
    MultiTaskBatchSampler,
    MultiTaskCollator,
    MultiTaskDataset,
    TaskSet,
    list_bigbench_subtasks,
    load_bigbench_task,
    load_hf_dataset,
    load_jsonl,
    split_examples,
    task_probabilities,
)

WORDS = "what is one two three plus minus the answer good bad movie film great awful a an yes no".split()


def word_tokenizer(chat: bool = False):
    """A tiny word-level fast tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", "<user>", "<bot>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    if chat:
        tokenizer.chat_template = (
            "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<bot> {% endif %}"
        )
    return tokenizer


@pytest.fixture(scope="module")
def encoder_tokenizer():
    """MiniLM's tokenizer when its package is installed, else the word-level one."""
    try:
        importlib.metadata.version(assets.MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return word_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.minilm_path())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- task set


def test_task_set_ids_labels_and_round_trip():
    tasks = TaskSet([("sentiment", ["negative", "positive"]), "math"])
    assert tasks.names == ["sentiment", "math"]
    assert tasks.task_id("math") == 1 and tasks.name(0) == "sentiment"
    assert tasks.labels("sentiment") == ("negative", "positive") and tasks.labels("math") is None
    assert tasks.num_labels("sentiment") == 2 and tasks.num_labels("math") == 0
    assert tasks.is_classification("sentiment") and not tasks.is_classification("math")
    assert TaskSet.from_dict(json.loads(json.dumps(tasks.to_dict()))) == tasks
    with pytest.raises(DataError, match="already"):
        tasks.add("math")
    with pytest.raises(DataError, match="unknown task 'nope'"):
        tasks.task_id("nope")


def test_task_set_assign_sets_ids_and_rejects_bad_examples():
    tasks = TaskSet([("sentiment", ["negative", "positive"]), "math"])
    examples = [Example("math", "one plus one", target="two"), Example("sentiment", "good", label=1)]
    assigned = tasks.assign(examples)
    assert [example.task_id for example in assigned] == [1, 0]
    assert examples[0].task_id is None
    with pytest.raises(DataError, match="example 1: unknown task 'other'"):
        tasks.assign([examples[0], Example("other", "x", target="y")])
    with pytest.raises(DataError, match="example 0 of task 'sentiment': label 2 is outside 0..1"):
        tasks.assign([Example("sentiment", "good", label=2)])
    with pytest.raises(DataError, match="has no target"):
        tasks.assign([Example("math", "one plus one")])
    with pytest.raises(DataError, match=r"tasks without examples: \['sentiment'\]"):
        tasks.assign(examples[:1], require_all=True)


# ----------------------------------------------------------------------------- JSONL


def test_load_jsonl_single_task_string_labels(tmp_path):
    path = write_jsonl(
        tmp_path / "sentiment.jsonl",
        [{"text": "great film", "label": "pos"}, "", {"text": "awful film", "label": "neg"}],
    )
    data = load_jsonl(path, task="sentiment")
    assert list(data) == ["sentiment"]
    task = data["sentiment"]
    assert task.labels == ("neg", "pos")
    assert [(example.text, example.label) for example in task.examples] == [("great film", 1), ("awful film", 0)]


def test_load_jsonl_multi_task_file_with_generation_and_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"task": "math", "question": "one plus one", "answer": ["two", "2"]},
            {"task": "yesno", "question": "is one two", "label": 1},
            {"task": "math", "question": "two plus one", "answer": "three"},
        ],
    )
    data = load_jsonl(path, text_field="question", target_field="answer")
    assert list(data) == ["math", "yesno"]
    math_task = data["math"]
    assert math_task.labels is None
    assert [example.target for example in math_task.examples] == ["two", "three"]
    assert math_task.examples[0].references == ("two", "2")
    assert data["yesno"].labels == ("0", "1") and data["yesno"].examples[0].label == 1
    with pytest.raises(DataError, match=r"mixed.jsonl:1: missing field 'text'"):
        load_jsonl(path)


def test_load_jsonl_checks_tasks_and_labels_against_a_task_set(tmp_path):
    tasks = TaskSet([("yesno", ["no", "yes"])])
    path = write_jsonl(tmp_path / "t.jsonl", [{"task": "yesno", "text": "a", "label": "yes"}])
    assert load_jsonl(path, task_set=tasks)["yesno"].examples[0].label == 1
    path = write_jsonl(tmp_path / "t.jsonl", [{"task": "yesno", "text": "a", "label": 0}, {"task": "x", "text": "b"}])
    with pytest.raises(DataError, match=r"t.jsonl:2: unknown task 'x'"):
        load_jsonl(path, task_set=tasks)


def test_load_jsonl_joins_text_fields_and_uses_given_labels(tmp_path):
    path = write_jsonl(tmp_path / "nli.jsonl", [{"premise": "a", "hypothesis": "b", "label": "yes"}])
    task = load_jsonl(path, task="nli", text_field=["premise", "hypothesis"], labels=["no", "yes"])["nli"]
    assert task.examples[0].text == "a\nb" and task.examples[0].label == 1 and task.labels == ("no", "yes")


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (['{"text": "a", "label": 0}', "{not json"], {"task": "t"}, r"bad.jsonl:2: invalid JSON"),
        ([{"text": "a"}], {"task": "t"}, r"bad.jsonl:1: needs a 'label'"),
        ([{"label": 1}], {"task": "t"}, r"bad.jsonl:1: missing field 'text'"),
        ([{"text": "a", "label": 0}], {}, r"bad.jsonl:1: missing field 'task'"),
        ([{"text": "a", "label": "maybe"}], {"task": "t", "labels": ["no", "yes"]}, r"bad.jsonl:1: label 'maybe'"),
        ([{"text": "a", "label": 5}], {"task": "t", "labels": ["no", "yes"]}, r"bad.jsonl:1: label 5 is outside"),
        ([{"text": "a", "label": 0}, {"text": "b", "target": "c"}], {"task": "t"}, r"bad.jsonl:2: missing field"),
        ([], {"task": "t"}, r"bad.jsonl: no examples"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, rows, kwargs, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_jsonl(path, **kwargs)


def test_load_hf_dataset_from_disk_and_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    dataset = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "sst"))
    task = load_hf_dataset(tmp_path / "sst", task="sst", text_field="sentence")
    assert task.labels == ("neg", "pos")
    assert [(example.text, example.label) for example in task.examples] == [("good", 1), ("bad", 0)]
    with pytest.raises(DataError, match="has no split 'test'"):
        load_hf_dataset(tmp_path / "sst", task="sst", split="test", text_field="sentence")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_hf_dataset("glue", task="sst2", config="sst2", split="validation", text_field="sentence")
    assert calls == [("glue", "sst2", "validation")] and hub.name == "sst2" and len(hub.examples) == 2


# ----------------------------------------------------------------------------- splits


def make_examples(task: str, count: int) -> list[Example]:
    return [Example(task, f"{task} {i}", label=i % 2) for i in range(count)]


def test_split_examples_is_seeded_disjoint_and_pinned():
    examples = make_examples("a", 10) + make_examples("b", 20)
    splits = split_examples(examples, validation=0.2, test=3, seed=7)
    again = split_examples(examples, validation=0.2, test=3, seed=7)
    assert splits == again
    counts = {name: Counter(example.task for example in part) for name, part in splits._asdict().items()}
    assert counts == {"train": {"a": 5, "b": 13}, "validation": {"a": 2, "b": 4}, "test": {"a": 3, "b": 3}}
    texts = [example.text for part in splits for example in part]
    assert sorted(texts) == sorted(example.text for example in examples)
    # Pinned: the split must not change across runs, platforms and Python versions.
    assert [example.text for example in splits.validation if example.task == "a"] == ["a 9", "a 6"]
    assert split_examples(examples, validation=0.2, test=3, seed=8) != splits


def test_split_examples_tasks_are_independent_and_capped():
    alone = split_examples(make_examples("a", 50), seed=3)
    together = split_examples(make_examples("a", 50) + make_examples("b", 40), seed=3)
    assert [e for e in together.train if e.task == "a"] == alone.train
    capped = split_examples(make_examples("a", 50) + make_examples("b", 40), seed=3, max_train={"a": 4})
    assert Counter(example.task for example in capped.train) == {"a": 4, "b": 32}
    assert capped.train[:4] == alone.train[:4]
    with pytest.raises(DataError, match="fewer than"):
        split_examples(make_examples("a", 3), validation=2, test=2)
    with pytest.raises(DataError, match="below 1"):
        split_examples(make_examples("a", 3), validation=1.0)


# ----------------------------------------------------------------------------- templates and collators


def test_classification_template_and_collator(encoder_tokenizer):
    tasks = TaskSet([("sentiment", ["bad", "good"]), ("topic", ["film", "math"])])
    examples = tasks.assign(
        [Example("sentiment", "great movie", label=1), Example("topic", "one plus two is three", label=1)]
    )
    template = ClassificationTemplate(encoder_tokenizer, max_length=5)
    features = template(examples[1])
    assert len(features["input_ids"]) == 5 and features["labels"] == 1 and features["task_ids"] == 1
    batch = MultiTaskCollator(encoder_tokenizer, template=template)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["labels"].tolist() == [1, 1] and batch["task_ids"].tolist() == [0, 1]
    assert batch["labels"].dtype == batch["task_ids"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert lengths[1] == 5 and lengths[0] < 5
    assert (batch["input_ids"][0, lengths[0] :] == encoder_tokenizer.pad_token_id).all()


def test_generation_template_masks_prompt_without_chat_template():
    tokenizer = word_tokenizer()
    example = TaskSet(["math"]).assign([Example("math", "what is one plus two", target="three")])[0]
    features = GenerationTemplate(tokenizer, separator=" the answer is ")(example)
    ids = tokenizer.convert_tokens_to_ids
    prompt = ids(["what", "is", "one", "plus", "two", "the", "answer", "is"])
    assert features["input_ids"] == prompt + ids(["three", "[EOS]"])
    assert features["labels"] == [IGNORE_INDEX] * len(prompt) + ids(["three", "[EOS]"])
    assert features["task_ids"] == 0


def test_generation_template_uses_chat_template_and_truncates_prompt_start():
    tokenizer = word_tokenizer(chat=True)
    example = TaskSet(["math"]).assign([Example("math", "what is one plus two", target="three")])[0]
    template = GenerationTemplate(tokenizer, max_length=32)
    ids = tokenizer.convert_tokens_to_ids
    assert template.prompt_ids(example) == ids(["<user>", "what", "is", "one", "plus", "two", "<bot>"])
    features = template(example)
    assert features["labels"][-2:] == ids(["three", "[EOS]"])
    assert features["labels"][:-2] == [IGNORE_INDEX] * 7
    short = GenerationTemplate(tokenizer, max_length=5)(example)
    assert short["input_ids"] == ids(["plus", "two", "<bot>", "three", "[EOS]"])
    assert short["labels"] == [IGNORE_INDEX] * 3 + ids(["three", "[EOS]"])
    with pytest.raises(DataError, match="no chat template"):
        GenerationTemplate(word_tokenizer(), use_chat_template=True)(example)


def test_generation_collator_pads_labels_right_and_prompts_left():
    tokenizer = word_tokenizer()
    tasks = TaskSet(["math", "qa"])
    examples = tasks.assign(
        [Example("math", "one plus one", target="two"), Example("qa", "what is the answer", target="no")]
    )
    template = GenerationTemplate(tokenizer)
    batch = MultiTaskCollator(tokenizer, template=template, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 2
    assert (
        batch["labels"][0].tolist()
        == [IGNORE_INDEX] * 3 + tokenizer.convert_tokens_to_ids(["two", "[EOS]"]) + [IGNORE_INDEX] * 3
    )
    assert batch["task_ids"].tolist() == [0, 1]
    prompts = MultiTaskCollator(tokenizer, padding_side="left")([template.encode_prompt(e) for e in examples])
    assert "labels" not in prompts
    assert prompts["attention_mask"][0].tolist() == [0, 1, 1, 1]
    assert prompts["input_ids"][0, 0].item() == tokenizer.pad_token_id
    with pytest.raises(DataError, match="no template"):
        MultiTaskCollator(tokenizer)(examples)


# ----------------------------------------------------------------------------- samplers


def test_task_probabilities():
    sizes = [100, 400, 0]
    assert task_probabilities(sizes, "proportional") == pytest.approx([0.2, 0.8, 0.0])
    assert task_probabilities(sizes, "temperature", temperature=1.0) == pytest.approx([0.2, 0.8, 0.0])
    assert task_probabilities(sizes, "temperature", temperature=2.0) == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert task_probabilities(sizes, "uniform") == pytest.approx([0.5, 0.5, 0.0])
    more = torch.softmax(torch.tensor([0.2, 0.8], dtype=torch.float64), 0).tolist()
    assert task_probabilities(sizes, "more") == pytest.approx([*more, 0.0])
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        task_probabilities(sizes, "random")


def test_proportional_sampler_covers_each_example_once_per_epoch():
    task_ids = [0] * 6 + [1] * 10
    sampler = MultiTaskBatchSampler(task_ids, batch_size=4, seed=1)
    first = list(sampler)
    assert len(first) == len(sampler) == 4
    assert sorted(i for batch in first for i in batch) == list(range(16))
    assert sampler.epoch == 1
    second = list(sampler)
    assert second != first and sorted(i for batch in second for i in batch) == list(range(16))
    assert list(MultiTaskBatchSampler(task_ids, batch_size=4, seed=1)) == first
    single = MultiTaskBatchSampler(task_ids, batch_size=4, mixed=False, seed=1)
    batches = list(single)
    assert len(batches) == 2 + 3
    assert all(len({task_ids[i] for i in batch}) == 1 for batch in batches)
    assert {i for batch in batches for i in batch} == set(range(16))
    assert len(MultiTaskBatchSampler(task_ids, batch_size=4, mixed=False, drop_last=True)) == 1 + 2


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform", "more"])
def test_sampler_resumes_exactly(strategy):
    task_ids = [0] * 7 + [1] * 13 + [2] * 30
    sampler = MultiTaskBatchSampler(task_ids, batch_size=4, strategy=strategy, seed=5)
    reference = list(sampler) + list(sampler)
    resumed_from = MultiTaskBatchSampler(task_ids, batch_size=4, strategy=strategy, seed=5)
    stream = iter(resumed_from)
    consumed = [next(stream) for _ in range(len(sampler) - 3)]
    state = json.loads(json.dumps(resumed_from.state_dict()))
    fresh = MultiTaskBatchSampler(task_ids, batch_size=4, strategy=strategy, seed=5)
    fresh.load_state_dict(state)
    assert consumed + list(fresh) + list(fresh) == reference
    with pytest.raises(ValueError, match="cannot resume: seed"):
        MultiTaskBatchSampler(task_ids, batch_size=4, strategy=strategy, seed=6).load_state_dict(state)


@pytest.mark.parametrize("strategy", ["proportional", "more"])
def test_sampler_shards_each_global_batch_across_ranks(strategy):
    task_ids = [0] * 20 + [1] * 30 + [2] * 10
    reference = MultiTaskBatchSampler(task_ids, batch_size=6, strategy=strategy, seed=2)
    shards = [
        list(MultiTaskBatchSampler(task_ids, batch_size=2, strategy=strategy, seed=2, num_replicas=3, rank=r))
        for r in range(3)
    ]
    global_batches = reference.global_batches(0)
    assert all(len(shard) == len(global_batches) for shard in shards)
    for step, batch in enumerate(global_batches):
        assert shards[0][step] + shards[1][step] + shards[2][step] == batch
        if strategy == "more":
            assert len({task_ids[i] for i in batch}) == 1


def test_sampled_strategies_follow_their_task_probabilities():
    task_ids = [0] * 10 + [1] * 90
    for strategy, expected in [("temperature", [0.25, 0.75]), ("uniform", [0.5, 0.5])]:
        sampler = MultiTaskBatchSampler(task_ids, 10, strategy=strategy, seed=0, batches_per_epoch=400)
        counts = Counter(task_ids[i] for batch in sampler for i in batch)
        assert counts[0] / 4000 == pytest.approx(expected[0], abs=0.03)
    more = MultiTaskBatchSampler(task_ids, 10, strategy="more", seed=0, batches_per_epoch=2000)
    first_tasks = Counter(task_ids[batch[0]] for batch in more)
    assert first_tasks[0] / 2000 == pytest.approx(task_probabilities([10, 90], "more")[0], abs=0.03)
    # Without replacement within a task: ten draws from task 0 use all of its ten examples.
    uniform = MultiTaskBatchSampler(task_ids, 20, strategy="uniform", mixed=False, seed=4)
    task0 = [batch for batch in uniform.global_batches(0) if task_ids[batch[0]] == 0]
    assert task0 and sorted(task0[0][:10]) == list(range(10))


def test_dataloader_end_to_end(encoder_tokenizer):
    tasks = TaskSet([("sentiment", ["bad", "good"]), ("topic", ["film", "math"])])
    examples = tasks.assign(
        [Example("sentiment", f"a {w} movie", label=int(w == "great")) for w in ("great", "awful") * 4]
        + [Example("topic", f"one plus {w}", label=1) for w in ("one", "two", "three")]
    )
    dataset = MultiTaskDataset(examples, ClassificationTemplate(encoder_tokenizer))
    sampler = MultiTaskBatchSampler(dataset.task_ids, batch_size=3, strategy="more", seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=MultiTaskCollator(encoder_tokenizer))
    batches = list(loader)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        assert batch["input_ids"].shape[0] == 3 and batch["task_ids"].unique().numel() == 1
        task = tasks.name(batch["task_ids"][0].item())
        assert batch["labels"].max() < tasks.num_labels(task)


# ----------------------------------------------------------------------------- BIG-bench files


def write_task(directory: Path, examples: list, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "task.json").write_text(json.dumps({"name": directory.name, **fields, "examples": examples}))


def test_bigbench_classification_generation_and_subtasks(tmp_path):
    write_task(
        tmp_path / "yesno",
        [
            {"input": "is one two", "target_scores": {"yes": 0, "no": 1}},
            {"input": "is two two", "target_scores": {"no": 0, "yes": 1}},
        ],
        task_prefix="Answer.",
    )
    task = load_bigbench_task("yesno", tmp_path)
    assert task.labels == ("yes", "no") and [e.label for e in task.examples] == [1, 0]
    prefixed = load_bigbench_task("yesno", tmp_path, add_prefixes=True)
    assert prefixed.examples[0].text == "Answer.\nQ: is one two\nA: "
    generated = load_bigbench_task("yesno", tmp_path, mode="generation")
    assert [e.target for e in generated.examples] == ["no", "yes"]

    write_task(tmp_path / "reviews", [])
    for language, label in [("en", "good"), ("de", "gut")]:
        for kind in ("all", "hotels"):
            write_task(
                tmp_path / "reviews" / f"{kind}_{language}",
                [{"input": f"{kind} {language}", "target_scores": {label: 1, "x": 0}}],
            )
    assert list_bigbench_subtasks("reviews", tmp_path) == ["all_de", "all_en", "hotels_de", "hotels_en"]
    english = load_bigbench_task("reviews", tmp_path)
    assert [e.text for e in english.examples] == ["all en", "hotels en"]
    assert load_bigbench_task("reviews/all_de", tmp_path).labels == ("gut", "x")
    both = load_bigbench_task("reviews", tmp_path, language=None)
    assert both.labels is None and len(both.examples) == 4

    write_task(
        tmp_path / "math",
        [
            {"input": "one plus one", "target": ["two", "2"]},
            {"input": "pick", "target_scores": {"three": 1, "one": 0}},
        ],
    )
    math_task = load_bigbench_task("math", tmp_path, task_name="arith")
    assert math_task.name == "arith" and math_task.labels is None
    assert [(e.target, e.references) for e in math_task.examples] == [("two", ("two", "2")), ("three", ("three",))]


def test_bigbench_errors_name_file_and_example(tmp_path):
    write_task(tmp_path / "broken", [{"input": "a", "target": "b"}, {"target": "c"}])
    with pytest.raises(DataError, match=r"broken/task.json example 1: missing field 'input'"):
        load_bigbench_task("broken", tmp_path)
    write_task(tmp_path / "tied", [{"input": "a", "target_scores": {"x": 1, "y": 1}}])
    with pytest.raises(DataError, match=r"tied/task.json example 0: target_scores has 2 best choices"):
        load_bigbench_task("tied", tmp_path)
    write_task(
        tmp_path / "varying", [{"input": "a", "target_scores": {"x": 1}}, {"input": "b", "target_scores": {"y": 1}}]
    )
    with pytest.raises(DataError, match=r"varying/task.json example 1: choices \['y'\] differ"):
        load_bigbench_task("varying", tmp_path, mode="classification")
    write_task(tmp_path / "empty", [])
    with pytest.raises(DataError, match="has no examples"):
        load_bigbench_task("empty", tmp_path)
    with pytest.raises(DataError, match="no BIG-bench task 'missing'"):
        load_bigbench_task("missing", tmp_path)


def _bigbench_cached() -> bool:
    return (
        os.environ.get("LORAMIX_TEST_ASSETS") == "1"
        or (assets.cache_dir() / assets.BIGBENCH_DIR_NAME / ".loramix-complete").is_file()
    )


@pytest.mark.skipif(not _bigbench_cached(), reason="BIG-bench not cached; set LORAMIX_TEST_ASSETS=1")
@pytest.mark.parametrize(
    ("name", "labels", "size"),
    [
        ("multiemo", ("ambivalent", "positive", "negative", "neutral"), 8215),
        ("vitaminc_fact_verification", ("True", "False", "Neither"), 54668),
        ("movie_dialog_same_or_different", ("same", "different"), 50000),
        ("hyperbaton", ("a", "b"), 50000),
        ("formal_fallacies_syllogisms_negation", ("valid", "invalid"), 14200),
        ("arithmetic", None, 15023),
        ("elementary_math_qa", None, 7688),
        ("word_unscrambling", None, 8917),
        ("date_understanding", None, 369),
        ("qa_wikidata", None, 20442),
    ],
)
def test_real_bigbench_tasks(name, labels, size):
    task = load_bigbench_task(name)
    assert task.labels == labels and len(task.examples) == size
    assert all(e.text for e in task.examples[:100])
    if labels is None:
        assert all(e.target for e in task.examples[:100])
