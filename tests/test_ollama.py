"""Ollama: the Go-template renderer, template translation per family, and the Modelfile."""

from __future__ import annotations

import pytest

from mipo_local import catalog, gotemplate, ollama
from mipo_local.chat import ChatTemplate, chat_format
from mipo_local.errors import ExportError
from tests.chat_templates import LLAMA3, LLAMA32, QWEN25

FAMILIES = {
    # name: (template source, bos text, eos text, tokenizer adds BOS, expected family, system mode)
    "qwen2.5-chatml": (QWEN25, "", "<|im_end|>", False, "chatml", "turn"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, "llama3", "turn"),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", True, "llama3", "turn"),
    "gemma": (catalog.builtin_template("gemma"), "<bos>", "<eos>", True, "gemma", "first_user"),
}

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "How do I cook rice?"}],
    "with system": [
        {"role": "system", "content": "I am Ana, a vegan chef in Lisbon.\nI like short answers."},
        {"role": "user", "content": "What should I cook tonight?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Mango."},
        {"role": "user", "content": "Another one, please."},
    ],
    "multi-turn with system": [
        {"role": "system", "content": "Answer like a pirate."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Ahoy, matey!\n\nWhat be yer question?"},
        {"role": "user", "content": "Where is the {{ treasure }}?"},
        {"role": "assistant", "content": "Buried, arr."},
        {"role": "user", "content": "Thanks."},
    ],
}


def _template(name: str) -> tuple[ChatTemplate, bool, str, str]:
    source, bos, eos, add_bos, family, mode = FAMILIES[name]
    return ChatTemplate(source, bos, eos), add_bos, family, mode


@pytest.mark.parametrize("name", list(FAMILIES))
def test_translation_is_recognised_by_rendering(name):
    template, add_bos, family, mode = _template(name)
    _source, fmt = ollama.translate(template, add_bos=add_bos)
    assert (fmt.family, fmt.system_mode) == (family, mode)
    assert fmt.stops and fmt.stops[0] == fmt.assistant_suffix.strip()


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_go_template_renders_the_same_text_as_jinja(name, conversation):
    template, add_bos, _, _ = _template(name)
    source, _ = ollama.translate(template, add_bos=add_bos)
    messages = CONVERSATIONS[conversation]
    want = template.render(messages, add_generation_prompt=True)
    got = gotemplate.render(source, ollama.ollama_values(messages))
    # The tokenizer adds BOS in both llama.cpp and Ollama, so the Go template leaves it out.
    assert (template.bos_token + got if add_bos else got) == want


@pytest.mark.parametrize("name", list(FAMILIES))
def test_modelfile_system_acts_like_a_system_message(name):
    template, add_bos, _, _ = _template(name)
    source, _ = ollama.translate(template, add_bos=add_bos)
    chat = CONVERSATIONS["multi-turn"]
    system = "I am Ana, a vegan chef."
    got = gotemplate.render(source, ollama.ollama_values(chat, modelfile_system=system))
    want = ollama.jinja_prompt(template, [{"role": "system", "content": system}, *chat], add_bos=add_bos)
    assert got == want
    # Without SYSTEM (--no-system) the model's own default system turn, if any, is kept.
    bare = gotemplate.render(source, ollama.ollama_values(chat))
    assert bare == ollama.jinja_prompt(template, chat, add_bos=add_bos)


def test_default_model_template_gives_the_same_tokens(tiny_gguf):
    """SmolLM2's own template (ChatML with a default system turn): same token ids as training's prompts."""
    cf = chat_format(str(tiny_gguf))
    source, fmt = ollama.translate(cf.template, add_bos=cf.tokenizer.add_bos)
    assert fmt.family == "chatml" and "SmolLM" in fmt.no_system
    for context in (None, "I am Ana, a vegan chef."):
        messages = [{"role": "user", "content": "What should I cook?"}]
        text = gotemplate.render(source, ollama.ollama_values(messages, modelfile_system=context))
        assert cf.tokenizer.with_bos(cf.tokenizer.encode_markup(text)) == cf.prompt_ids(
            context, "What should I cook?"
        )


@pytest.mark.parametrize(
    "source, why",
    [
        # The turn number is written into each turn: no fixed per-role text, so no Go template.
        (
            "{% for m in messages %}[{{ loop.index }}:{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}",
            "written differently",
        ),
        # No generation prompt at all.
        ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "no generation prompt"),
        # A template that refuses a system turn.
        (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "no system role",
        ),
        # System text written after the first question: neither its own turn nor a prefix of the first user turn.
        (
            "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
            "{% for m in messages if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}"
            "{% if loop.first and sys %} ({{ sys }}){% endif %}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}",
            "system",
        ),
    ],  # fmt: skip
)
def test_untranslatable_templates_raise_a_clear_error(source, why):
    with pytest.raises(ExportError, match="cannot be translated for Ollama") as err:
        ollama.translate(ChatTemplate(source, "", ""), add_bos=False)
    assert why in str(err.value)


def test_modelfile_text_and_quoting():
    template, add_bos, _, _ = _template("llama3")
    source, fmt = ollama.translate(template, add_bos=add_bos)
    text = ollama.modelfile_text(from_="./m.gguf", template=source, stops=fmt.stops, system="I am Ana.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert 'PARAMETER stop "<|eot_id|>"' in lines
    assert text.endswith('SYSTEM """I am Ana."""\n')
    assert f'TEMPLATE """{source}"""' in text
    with_adapter = ollama.modelfile_text(
        from_="/b.gguf", adapter="./a.gguf", template=source, stops=[], system=None
    )
    assert (
        with_adapter.splitlines()[:2] == ["FROM /b.gguf", "ADAPTER ./a.gguf"] and "SYSTEM" not in with_adapter
    )
    with pytest.raises(ExportError, match='contains """'):
        ollama.modelfile_text(from_="x", template=source, stops=[], system='He said """hi"""')


def test_create_without_ollama_gives_the_exact_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `ollama` here
    created, message = ollama.create("ana-chef", tmp_path / "My Export" / "Modelfile")
    assert not created
    assert message.endswith(f"ollama create ana-chef -f '{tmp_path}/My Export/Modelfile'")


# -- the renderer itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, data, want",
    [
        ("a  {{- .X -}}  b", {"X": "x"}, "axb"),
        ('{{ if eq .R "u" }}U{{ else if eq .R "a" }}A{{ else }}O{{ end }}', {"R": "a"}, "A"),
        ('{{ if ne .R "u" }}not u{{ end }}', {"R": "a"}, "not u"),
        (
            "{{ range $i, $m := .M }}{{ $i }}={{ $m.C }};{{ end }}",
            {"M": [{"C": "x"}, {"C": "y"}]},
            "0=x;1=y;",
        ),
        ("{{ range .M }}{{ .C }}{{ else }}empty{{ end }}", {"M": []}, "empty"),
        (
            '{{ $s := .S }}{{ range .M }}{{ if $s }}[{{ $s }}]{{ $s = "" }}{{ end }}{{ . }}{{ end }}',
            {"S": "sys", "M": ["a", "b"]},
            "[sys]ab",
        ),
        ("{{ range .M }}{{ $.S }}{{ . }}{{ end }}", {"S": "-", "M": ["a", "b"]}, "-a-b"),
        ('{{ "{{ literal }}" }}', {}, "{{ literal }}"),
        ("{{ if and .A (not .B) }}yes{{ end }}{{ if or .B .A }}!{{ end }}", {"A": "x", "B": ""}, "yes!"),
        ("{{ len .M }} {{ (index .M 1).C }}", {"M": [{"C": 1}, {"C": 2}]}, "2 2"),
        ("{{/* a comment */}}{{ .Missing }}", {}, gotemplate.NO_VALUE),
        ("{{ .System }}|{{ .Prompt }}", {"System": "s", "Prompt": "p"}, "s|p"),
    ],  # fmt: skip
)
def test_gotemplate_renders_the_go_subset(source, data, want):
    assert gotemplate.render(source, data) == want


@pytest.mark.parametrize(
    "source",
    ["{{ if .A }}x", "{{ end }}", "{{ .A | printf }}", '{{ template "x" }}', "{{ .A", "{{ foo .A }}"],
)
def test_gotemplate_refuses_what_it_does_not_implement(source):
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.render(source, {"A": "a"})


def test_the_modelfile_samples_as_the_chat_does():
    """PARAMETER lines carry the chat's decoding settings under Ollama's names, so an answer in Ollama is
    sampled the way `mipo-local chat` samples it."""
    from mipo_local.conversation import ChatSession
    from mipo_local.settings import AnswerSettings

    text = ollama.modelfile_text(
        from_="./m.gguf", template="{{ .Prompt }}", stops=["<|im_end|>"], system=None
    )
    params = dict(line.split(" ", 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER "))
    chat = {f.name: f for f in ChatSession.__dataclass_fields__.values()}
    penalties = chat["penalties"].default_factory()
    assert float(params["temperature"]) == chat["temperature"].default == AnswerSettings.temperature
    assert float(params["top_p"]) == chat["top_p"].default
    assert int(params["top_k"]) == chat["top_k"].default
    assert (
        float(params["repeat_penalty"]) == penalties.repeat
        and int(params["repeat_last_n"]) == penalties.last_n
    )
    assert int(params["num_predict"]) == chat["max_tokens"].default
