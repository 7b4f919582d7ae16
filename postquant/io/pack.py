"""Dense bit packing of integer codes, as stored in checkpoints: see `postquant.grids.pack`.

The packing is tensor math below the layers (a `QuantizedLayer` keeps its codes packed), so it lives in
`postquant.grids`; this module keeps the name the checkpoint code and users import it by.
"""

from postquant.grids.pack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]
