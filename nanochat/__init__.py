"""nanochat: from raw web text to a chat model, in one small readable harness."""
