import json

import pytest

from mipo_local.errors import UserInputError
from mipo_local.prompts_import import parse_prompts


def test_plain_text(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("What is up?\n\n  How do I cook rice?  \n")
    assert parse_prompts(f) == (["What is up?", "How do I cook rice?"], "text")


def test_markdown_list(tmp_path):
    f = tmp_path / "p.md"
    f.write_text("# My questions\nSome prose.\n- First?\n* Second?\n1. Third?\n")
    assert parse_prompts(f) == (["First?", "Second?", "Third?"], "markdown")


def test_jsonl_and_bad_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "A?"}\n{"prompt": "B?", "x": 1}\n')
    assert parse_prompts(f) == (["A?", "B?"], "jsonl")
    f.write_text('{"prompt": "A?"}\n{"prompt": "B?"\n')
    with pytest.raises(UserInputError, match="line 2 is not valid JSON"):
        parse_prompts(f)
    f.write_text('{"prompt": "A?"}\n{"question": "B?"}\n')
    with pytest.raises(UserInputError, match="line 2 has no string field 'prompt'"):
        parse_prompts(f)


def test_chatgpt_export_user_turns(tmp_path):
    conv = {
        "title": "t",
        "mapping": {
            "a": {"message": {"author": {"role": "system"}, "content": {"parts": ["sys"]}, "create_time": 1}},
            "b": {
                "message": {
                    "author": {"role": "user"},
                    "content": {"parts": ["How do I knit?"]},
                    "create_time": 2,
                }
            },
            "c": {
                "message": {
                    "author": {"role": "assistant"},
                    "content": {"parts": ["Like so"]},
                    "create_time": 3,
                }
            },
            "d": {
                "message": {"author": {"role": "user"}, "content": {"parts": ["And purl?"]}, "create_time": 4}
            },
            "root": {"message": None},
        },
    }
    f = tmp_path / "conversations.json"
    f.write_text(json.dumps([conv]))
    assert parse_prompts(f) == (["How do I knit?", "And purl?"], "chatgpt")


def test_non_utf8_names_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"fine\nalso fine\ncaf\xe9?\n")
    with pytest.raises(UserInputError, match="line 3 is not valid UTF-8"):
        parse_prompts(f)


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="File not found"):
        parse_prompts(tmp_path / "nope.txt")
