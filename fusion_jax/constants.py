"""Special ids shared with the reference (fusion/constants.py)."""
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
LATENT_IMAGE_TOKEN_INDEX = -300
INSTRUCT_INDEX = -400

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_LATENT_IMAGE_TOKEN = "<latent_image>"
DEFAULT_IM_START_TOKEN = "<vision_start>"
DEFAULT_IM_END_TOKEN = "<vision_end>"

# Crops of one image (fusion_jax.data.images): the 2x2 high-resolution tiles (TL, TR, BL, BR),
# stitched into the global map, then the whole image, the main view encoded with the question.
NUM_TILES = 4
MAIN_VIEW = NUM_TILES
NUM_CROPS = NUM_TILES + 1
