"""Training data: read and validate records, render prompts, tokenize with masked prompts, pack.

    records = load_records("train.jsonl")                        # no tokenizer: fails fast on bad data
    train, held = train_eval_split(records.samples, eval_fraction=0.05, seed=0)
    examples, stats = tokenize_samples(train, tokenizer, max_seq_len=512)
    rows, pack_stats = pack(examples, 512, tokenizer.pad_token_id, seed=seed, epoch=epoch)
    for batch in batches(rows, batch_size=4, seed=seed, epoch=epoch, start=resume_at):
        ...  # input_ids / labels / position_ids (B, T) long, seq_lens list[list[int]]
"""

from lorakit.data.collate import batch_indices, batches, collate_packed, collate_padded, num_batches, padded_batches
from lorakit.data.formats import FORMATS, Message, Sample, detect_format
from lorakit.data.packing import PackedRow, PackStats, best_fit_decreasing, pack, pad_rows
from lorakit.data.readers import RawRecord, read_records
from lorakit.data.records import BAD_RECORD_POLICIES, BadRecord, Records, load_records
from lorakit.data.split import train_eval_split
from lorakit.data.templates import ALPACA, CHATML, TEMPLATES, PromptTemplate, get_template, instruction_prompt
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedExample, TokenizeStats, tokenize_sample, tokenize_samples

__all__ = [
    "read_records", "RawRecord",
    "load_records", "Records", "BadRecord", "BAD_RECORD_POLICIES",
    "FORMATS", "Message", "Sample", "detect_format",
    "train_eval_split",
    "PromptTemplate", "ALPACA", "CHATML", "TEMPLATES", "get_template", "instruction_prompt",
    "tokenize_samples", "tokenize_sample", "TokenizedExample", "TokenizeStats", "IGNORE_INDEX",
    "pack", "pad_rows", "PackedRow", "PackStats", "best_fit_decreasing",
    "batches", "padded_batches", "collate_packed", "collate_padded", "batch_indices", "num_batches",
]
