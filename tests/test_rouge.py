from rouge_score import rouge_scorer

from peftbench.pipeline.evaluation import ROUGE_TYPES, paired_rouge1_change, rouge

PREDICTIONS = ["Anna will meet Tom at the station at 6 pm.", "The cats were sleeping.", "Ben lost his keys again"]
REFERENCES = ["Tom will pick Anna up from the station at 6.", "The cat is sleeping on the sofa.", "Ben has lost his keys."]


def test_matches_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    expected = {k: 0.0 for k in ROUGE_TYPES}
    for p, r in zip(PREDICTIONS, REFERENCES):  # one sentence each: ROUGE-Lsum needs no splitting here
        s = scorer.score(r, p)
        for k in ROUGE_TYPES:
            expected[k] += s[k].fmeasure / len(PREDICTIONS)
    got = rouge(PREDICTIONS, REFERENCES)
    for k in ROUGE_TYPES:
        assert abs(got[k] - 100 * expected[k]) < 1e-3
    assert got["n"] == 3


def test_stemming_counts_cats_as_cat_and_identical_text_scores_100():
    assert rouge(["cats sleeping"], ["cat sleeps"])["rouge1"] == 100.0
    assert rouge(["a b c"], ["a b c"]) == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0, "n": 1}
    assert rouge(["x y"], ["a b"])["rouge1"] == 0.0


def test_rouge_lsum_scores_sentences_as_the_hf_summarisation_examples_do():
    """Two sentences in the reference, the prediction's in the other order: ROUGE-L (one LCS over
    the whole text) sees only one sentence's worth in order, ROUGE-Lsum (union LCS per sentence)
    finds both, as rouge-score does on texts with one sentence per line."""
    prediction = "Tom will bring the cake. Anna buys the flowers."
    reference = "Anna buys the flowers. Tom will bring the cake."
    scores = rouge([prediction], [reference])
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    by_line = scorer.score(reference.replace(". ", ".\n"), prediction.replace(". ", ".\n"))["rougeLsum"].fmeasure
    assert scores["rougeLsum"] == round(100 * by_line, 4) == 100.0
    assert scores["rougeL"] < 60


def test_paired_change_is_the_mean_per_example_difference_with_its_standard_error():
    """One example unchanged (0), one from 2 of 3 words to 3 of 3 (+33.33): mean 16.67, stdev 23.57 / sqrt(2)."""
    references = ["the cat sat", "a dog ran"]
    change = paired_rouge1_change(["the cat sat", "a dog ran"], ["the cat sat", "a cat ran"], references)
    assert change["n"] == 2 and abs(change["change"] - 100 / 6) < 1e-3 and abs(change["standard_error"] - 100 / 6) < 1e-3
    mean_gap = rouge(["the cat sat", "a dog ran"], references)["rouge1"] - rouge(["the cat sat", "a cat ran"], references)["rouge1"]
    assert abs(change["change"] - mean_gap) < 1e-3, "the mean change is the difference of the two ROUGE-1 scores"


def test_auto_generation_batch_is_16_on_the_cpu_and_sized_by_memory_on_a_gpu(monkeypatch):
    import types

    import torch

    from peftbench.pipeline import evaluation

    config = types.SimpleNamespace(num_attention_heads=9, hidden_size=576, num_key_value_heads=3, num_hidden_layers=30)
    weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    model = types.SimpleNamespace(config=config, parameters=lambda: iter([weight]))
    assert evaluation.auto_batch_size(model, 576) == evaluation.CPU_BATCH

    # A GPU, faked: per sequence the KV cache takes 2 x 30 layers x 3 heads x 64 x 2 bytes x 576 tokens.
    per_sequence = 2 * 30 * 3 * 64 * 2 * 576
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    for free_gib, expected in ((80, 1024), (4, 64), (1, 16)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device, f=free_gib: (f * 2**30, 141 * 2**30))
        batch = evaluation.auto_batch_size(model, 576)
        assert batch == expected and batch * per_sequence <= evaluation.AUTO_MEMORY_SHARE * free_gib * 2**30
    # Four runs side by side (a comparison's --jobs 4) each plan for a quarter of what is free.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (80 * 2**30, 141 * 2**30))
    monkeypatch.setenv("PEFTBENCH_RUNS_SHARING_GPU", "4")
    assert evaluation.auto_batch_size(model, 576) == 256


def test_a_static_kv_cache_gives_the_dynamic_caches_answers(tiny_model_dir, tiny_data_dir):
    """bench_eval's --cache-implementation static: preallocated KV cache, same greedy answers (float32)
    for a left-padded batch of dialogues of different lengths."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftbench.pipeline.evaluation import generate_summaries
    from peftbench.pipeline.modeling import load_tokenizer
    from peftbench.pipeline.recipe import PromptSection

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False  # a tied random model repeats its input; untied, it writes something
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    dialogues = [json.loads(line)["dialogue"] for line in (tiny_data_dir / "test.jsonl").read_text().splitlines()]
    assert len({len(d) for d in dialogues}) > 1
    dynamic = generate_summaries(model, tokenizer, PromptSection(), dialogues, batch_size=len(dialogues), max_new_tokens=10)
    static = generate_summaries(model, tokenizer, PromptSection(), dialogues, batch_size=len(dialogues), max_new_tokens=10,
                                cache_implementation="static")
    assert static == dynamic and any(dynamic)
