"""Parameter specifications, validation, and the XSD and catalogue generated from them."""

from .params import Param, TYPE_CODES, common_params

__all__ = ["Param", "TYPE_CODES", "common_params"]
