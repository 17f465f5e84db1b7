"""Export: model cards built from the pruning record, and pushing a pruned model folder to the Hugging Face Hub."""

from .card import BASE_MODEL_RELATION, make_model_card, read_record, reproduce_command, write_card
from .hub import push_folder, upload_files

__all__ = ["make_model_card", "write_card", "read_record", "reproduce_command", "push_folder", "upload_files",
           "BASE_MODEL_RELATION"]
