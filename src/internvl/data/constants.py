"""Special token strings and the label value that InternVL's data pipeline shares with the official code."""

# An image in the text becomes IMG_START + IMG_CONTEXT * n + IMG_END; the model swaps the IMG_CONTEXT embeddings
# for the vision features.
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# Grounding markup used by the official data (quadrilaterals, referring expressions, boxes).
QUAD_START_TOKEN = "<quad>"
QUAD_END_TOKEN = "</quad>"
REF_START_TOKEN = "<ref>"
REF_END_TOKEN = "</ref>"
BOX_START_TOKEN = "<box>"
BOX_END_TOKEN = "</box>"

# The placeholder users write in conversations; replaced by an image block before tokenization.
IMAGE_PLACEHOLDER = "<image>"
# A video line's placeholder; replaced by one IMAGE_PLACEHOLDER per sampled frame.
VIDEO_PLACEHOLDER = "<video>"
# The official defaults of how many frames training draws from a video (--min_num_frame, --max_num_frame).
MIN_NUM_FRAME, MAX_NUM_FRAME = 8, 32

# Added to the tokenizer as special tokens, in the official trainer's order (so new ids match its checkpoints).
SPECIAL_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    QUAD_START_TOKEN,
    QUAD_END_TOKEN,
    REF_START_TOKEN,
    REF_END_TOKEN,
    BOX_START_TOKEN,
    BOX_END_TOKEN,
)

# Label value that cross-entropy ignores (PyTorch's default ignore_index).
IGNORE_INDEX = -100
