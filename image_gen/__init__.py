"""AR image models, VQ tokenizers and relaxed/local acceptance (``mmspec.image_gen``)."""
