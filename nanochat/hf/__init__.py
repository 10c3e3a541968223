"""The files a Hugging Face export ships beside its weights (scripts/export.py copies them):
configuration_nanochat.py and modeling_nanochat.py (the network for `transformers`, loaded with
trust_remote_code=True, importing nothing from nanochat) and chat_template.jinja (the chat format
of Tokenizer.render_conversation as a Jinja template). They are kept here as real files so they
are linted, tested and read like the rest of the code; nanochat itself never imports them."""
