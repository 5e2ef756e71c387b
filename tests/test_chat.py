from mipo_local.chat import ChatFormat, build_messages
from mipo_local.llama_loader import load_llama


def test_prompt_render_uses_the_gguf_template(tiny_gguf):
    cf = ChatFormat(tiny_gguf)
    text = cf.prompt_text("I am Ana.", "Hi?")
    assert (
        text
        == "<|im_start|>system\nI am Ana.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a context the model's own default system turn appears (SmolLM2's template adds one).
    assert "<|im_start|>user\nHi?" in cf.prompt_text(None, "Hi?")


def test_pair_tokens_match_llama_cpp_tokenization_of_the_whole_text(tiny_gguf):
    cf = ChatFormat(tiny_gguf)
    pair = cf.encode_pair("I am Ana.", "Hi?", "Hello Ana!", "Hello.")
    llm = load_llama(tiny_gguf, vocab_only=True)
    full = cf.template.render(build_messages("I am Ana.", "Hi?", "Hello Ana!"), add_generation_prompt=False)
    whole = llm.tokenize(full.rstrip("\n").encode(), add_bos=False, special=True)
    assert pair.prompt + pair.chosen == list(whole)
    # The response ends with the end-of-turn token so the model learns to stop.
    assert cf.tokenizer.decode(pair.chosen[-1:]) == "<|im_end|>"
    assert pair.chosen != pair.rejected
