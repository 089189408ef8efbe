"""TEMPORARY: dispatches to softmask.reference until the fused soft-mask op lands (issue 3)."""
from softmask import reference as _ref


def word_gradcam(query, key, value, grad_context, word_index, *, key_padding_mask=None, scale=None, backend="auto"):
    return _ref.word_gradcam_reference(query, key, value, grad_context, word_index,
                                       key_padding_mask=key_padding_mask, scale=scale)


def word_gradcam_from_probs(attn_probs, attn_grads, word_index, *, backend="auto"):
    return _ref.word_gradcam_from_probs_reference(attn_probs, attn_grads, word_index)


def soft_mask_from_cam(cam, *, key_padding_mask=None, floor=0.0):
    return _ref.soft_mask_from_cam_reference(cam, key_padding_mask=key_padding_mask, floor=floor)


def text_driven_soft_mask(image_embeds, query, key, value, grad_context, word_index, *, key_padding_mask=None,
                          scale=None, floor=0.0, backend="auto"):
    return _ref.text_driven_soft_mask_reference(image_embeds, query, key, value, grad_context, word_index,
                                                key_padding_mask=key_padding_mask, scale=scale, floor=floor)
