"""Data: readers and validation for the common dataset shapes (`formats`), prompt and chat templates
(`templates`), and token ids with loss masks (`tokenize`)."""
