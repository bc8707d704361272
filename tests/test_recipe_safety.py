"""Recipes that could come from someone else: they cannot make peftbench spend unbounded memory."""

import time

from peftbench.cli import main

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
model: {name: *i}
"""


def test_a_yaml_alias_bomb_is_refused_quickly_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    assert main(["validate", str(recipe)]) == 2
    assert time.perf_counter() - start < 10  # it took 31 s and 2.4 GB before: any bound shows the refusal
    out = " ".join(capsys.readouterr().out.split())
    assert "expands to more than 100,000 YAML nodes through its aliases" in out and "Traceback" not in out


def test_small_aliases_still_load():
    from peftbench.pipeline.recipe import load_yaml

    text = "method: {name: lora, target_modules: &m [q_proj, v_proj]}\ntrainer: {name: hf, note: *m}\n"
    assert load_yaml(text, what="recipe") == {"method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
                                              "trainer": {"name": "hf", "note": ["q_proj", "v_proj"]}}
