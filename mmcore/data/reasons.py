"""Rejection reasons: every row that does not reach the dataset is counted under exactly one."""

from __future__ import annotations

# reason -> what it means; the order is the order in which rows meet the checks.
REASONS: dict[str, str] = {
    # read from the URL list, before any download
    "malformed_url": "the URL cannot be parsed or has no host",
    "scheme_not_allowed": "the URL scheme is not http or https (file://, ftp://, data: ...)",
    "duplicate_url": "the same URL appeared on an earlier row",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "caption_empty": "the caption is missing or blank",
    # read from a conversation file (source.kind instructions), before any download
    "malformed_json": "a line of a JSON-lines conversation file is not valid JSON",
    "bad_conversation": "not an object with an id and a 'conversations' list of {from, value} turns",
    "duplicate_id": "the same id appeared on an earlier row",
    "text_not_utf8": "the id, the image or a turn's text is not valid UTF-8",
    "bad_roles": "a turn's role is not human / gpt (user / assistant), or they do not alternate, human first "
                 "and an answer last",
    "empty_turn": "a turn's text is empty",
    "conversation_too_long": "more characters than source.max_conversation_chars",
    "no_image": "the row names no image (text-only conversations are not kept)",
    "image_token": "no <image> in the first turn of a row with an image, or one elsewhere or in a row without",
    "path_outside_root": "the image path leaves source.images (.., absolute, or a link out of it)",
    # the URL guard, while fetching
    "blocked_network": "the host resolves to a private, loopback, link-local, CGNAT, ULA or metadata address",
    "too_large": "the response is larger than guard.max_bytes",
    "too_many_pixels": "the image header declares more than guard.max_pixels pixels",
    "not_an_image": "the body is not an image (HTML, text, unknown format)",
    "truncated_image": "the image data ends early",
    "empty_body": "the response body is empty",
    "http_error": "the server answered with an HTTP error status",
    "timeout": "the server did not answer within the timeout or the body within the deadline",
    "connection_error": "the connection failed (refused, reset, DNS failure)",
    "image_not_found": "no file at the image's path under source.images",
    "robots_optout": "an X-Robots-Tag header opts the image out (noai, noimageai, ...)",
    "download_error": "any other download failure",
    # img2dataset's decoder and resizer
    "decode_error": "the image could not be decoded",
    "image_too_small": "the shorter side is below download.min_image_size",
    "aspect_ratio": "the aspect ratio exceeds download.max_aspect_ratio",
    # filters after download
    "caption_too_short": "fewer words than filters.caption_min_words",
    "caption_too_long": "more characters than filters.caption_max_chars",
    "language": "the caption is not in filters.languages",
    "exact_duplicate": "the stored image is byte-identical to an earlier row's",
    "near_duplicate": "the image's perceptual hash is within filters.near_dup_max_distance of an earlier row's",
    "model_score": "a model-score filter ranked the pair below its threshold",
    "semantic_duplicate": "its image embedding is within `dataset filter --by semantic-duplicates`'s cosine of an "
                          "earlier kept row's",
    "random_subset": "left out of a random subset (`mmpipe dataset filter --by random`: a filter's baseline)",
}

# img2dataset's own error messages (resizer and downloader) -> our reason.
_IMG2DATASET_MESSAGES = {
    "image too small": "image_too_small",
    "aspect ratio too large": "aspect_ratio",
    "Image decoding error": "decode_error",
    "Use of image disallowed by X-Robots-Tag directive": "robots_optout",
}


def classify_download_error(message: str | None) -> tuple[str, str]:
    """Map an img2dataset error message to (reason, detail).

    The URL guard writes its errors as "reason: detail", so they map to themselves.
    """
    message = (message or "").strip()
    if message in _IMG2DATASET_MESSAGES:
        return _IMG2DATASET_MESSAGES[message], message
    reason, sep, detail = message.partition(": ")
    if sep and reason in REASONS:
        return reason, detail
    if message.startswith("HTTP Error"):
        return "http_error", message
    if "timed out" in message:
        return "timeout", message
    return "download_error", message or "no error message"
