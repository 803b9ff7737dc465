"""The named data sets Kiln knows: where each file comes from, its checksum, size and license.

A file's `path` is where it lives under a data mirror (`KILN_DATA_DIR`) and under the user cache, so a
mirror is just a folder laid out like `kiln data get` would lay out the cache.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from kiln.errors import DataError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set, known by its canonical address and content hash."""

    path: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class DataSet:
    """A named data set: one or more files with a role each (text, train, val, archive, ...)."""

    name: str
    description: str
    license: str
    format: str  # text | instructions | preferences | tokenizer | builtin
    files: dict[str, RemoteFile] = field(default_factory=dict)
    # For archives: role -> member path inside the file with role "archive".
    members: dict[str, str] = field(default_factory=dict)
    records: int | None = None
    homepage: str = ""

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files.values()]
        return None if not sizes or None in sizes else sum(sizes)  # type: ignore[arg-type]


_GH = "https://raw.githubusercontent.com"
_LLMS = f"{_GH}/rasbt/LLMs-from-scratch/main"
_WT2 = f"{_GH}/pytorch/examples/main/word_language_model/data/wikitext-2"
_OPENAI_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"

DATASETS: dict[str, DataSet] = {
    d.name: d
    for d in [
        DataSet(
            name="tinyshakespeare",
            description="Tiny Shakespeare: 40,000 lines of the plays (char-rnn, nanoGPT)",
            license="public domain",
            format="text",
            homepage="https://github.com/karpathy/char-rnn",
            files={
                "text": RemoteFile(
                    "tinyshakespeare.txt",
                    (f"{_GH}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
                    1115394,
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                )
            },
        ),
        DataSet(
            name="the-verdict",
            description='Edith Wharton, "The Verdict" (LLMs-from-scratch ch. 2 and 5)',
            license="public domain",
            format="text",
            homepage="https://github.com/rasbt/LLMs-from-scratch",
            files={
                "text": RemoteFile(
                    "the-verdict.txt",
                    (f"{_LLMS}/ch02/01_main-chapter-code/the-verdict.txt",),
                    20479,
                    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
                )
            },
        ),
        DataSet(
            name="wikitext-2",
            description="WikiText-2 (tokenized, <unk>): Wikipedia good and featured articles",
            license="CC BY-SA 3.0",
            format="text",
            homepage="https://github.com/pytorch/examples/tree/main/word_language_model",
            files={
                "train": RemoteFile(
                    "wikitext-2/train.txt",
                    (f"{_WT2}/train.txt",),
                    10797148,
                    "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                ),
                "val": RemoteFile(
                    "wikitext-2/valid.txt",
                    (f"{_WT2}/valid.txt",),
                    1121681,
                    "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                ),
            },
        ),
        DataSet(
            name="wikitext-103",
            description="WikiText-103 raw (untokenized): 103M words of Wikipedia",
            license="CC BY-SA 3.0",
            format="text",
            homepage="https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
            files={
                "archive": RemoteFile(
                    "wikitext-103/wikitext-103-raw-v1.zip",
                    (
                        "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
                        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
                    ),
                    191984949,
                    "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
                )
            },
            members={
                "train": "wikitext-103-raw/wiki.train.raw",
                "val": "wikitext-103-raw/wiki.valid.raw",
            },
        ),
        DataSet(
            name="tinystories",
            description="TinyStories V2: short stories written by GPT-4 (the validation file)",
            license="CDLA-Sharing-1.0",
            format="text",
            homepage="https://huggingface.co/datasets/roneneldan/TinyStories",
            files={
                "text": RemoteFile(
                    "tinystories/TinyStoriesV2-GPT4-valid.txt",
                    (f"{_TINYSTORIES}/TinyStoriesV2-GPT4-valid.txt",),
                    22502601,
                    "6874bae9a4c1a4e7edcf0e53b86c17817e9cf881fc75ff2368da457b80c0585d",
                )
            },
        ),
        DataSet(
            name="instruction-data",
            description="1,100 Alpaca-format instructions (LLMs-from-scratch ch. 7)",
            license="Apache-2.0",
            format="instructions",
            records=1100,
            homepage="https://github.com/rasbt/LLMs-from-scratch",
            files={
                "text": RemoteFile(
                    "instruction-data.json",
                    (f"{_LLMS}/ch07/01_main-chapter-code/instruction-data.json",),
                    203524,
                    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                )
            },
        ),
        DataSet(
            name="instruction-data-with-preference",
            description="The same 1,100 instructions with a polite chosen and a rude rejected answer (ch. 7, DPO)",
            license="Apache-2.0",
            format="preferences",
            records=1100,
            homepage="https://github.com/rasbt/LLMs-from-scratch",
            files={
                "text": RemoteFile(
                    "instruction-data-with-preference.json",
                    (f"{_LLMS}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",),
                    386968,
                    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
                )
            },
        ),
        DataSet(
            name="alpaca",
            description="Stanford Alpaca: 52,002 instructions generated with text-davinci-003",
            license="CC BY-NC 4.0",
            format="instructions",
            records=52002,
            homepage="https://github.com/tatsu-lab/stanford_alpaca",
            files={
                "text": RemoteFile(
                    "alpaca_data.json",
                    (f"{_GH}/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json",),
                    22773992,
                    "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419",
                )
            },
        ),
        DataSet(
            name="dolly-15k",
            description="Databricks Dolly: 15,011 human-written instructions in 8 categories",
            license="CC BY-SA 3.0",
            format="instructions",
            records=15011,
            homepage="https://huggingface.co/datasets/databricks/databricks-dolly-15k",
            files={
                "text": RemoteFile(
                    "databricks-dolly-15k.jsonl",
                    (
                        "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/"
                        "databricks-dolly-15k.jsonl",
                    ),
                    13085339,
                    "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec",
                )
            },
        ),
        DataSet(
            name="python-docs",
            description="Python's own reference text (pydoc_data.topics): built in, needs no network",
            license="PSF-2.0",
            format="builtin",
            homepage="https://docs.python.org/3/reference/",
        ),
        DataSet(
            name="gpt2-tokenizer",
            description="GPT-2 byte-level BPE files (OpenAI format), read by tiktoken",
            license="Modified MIT (openai/gpt-2)",
            format="tokenizer",
            homepage="https://github.com/openai/gpt-2",
            files={
                "encoder": RemoteFile(
                    "gpt2-tokenizer/encoder.json",
                    (f"{_OPENAI_GPT2}/encoder.json",),
                    1042301,
                    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                ),
                "merges": RemoteFile(
                    "gpt2-tokenizer/vocab.bpe",
                    (f"{_OPENAI_GPT2}/vocab.bpe",),
                    456318,
                    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                ),
            },
        ),
    ]
}


def get_dataset(name: str) -> DataSet:
    """The registry entry called `name`, or a DataError that suggests close names."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, DATASETS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DataError(f"no file or data set called '{name}': {hint}`kiln data list` shows the data sets Kiln knows")
