"""Private helpers shared by every subpackage: atomic file I/O and locks (:mod:`.fileio`), array
interchange (:mod:`.arrays`), progress reporting (:mod:`.progress`), short reprs for error messages
(:mod:`.text`), starting Ray (:mod:`.ray_runtime`), reading a torch ``device``
setting (:mod:`.torch_device`, torch imported only when resolving) and the aliases of moved modules
(:mod:`.moved_modules`), optional imports that name their install extra (:mod:`.optional`). Nothing here imports
another part of bc_fast."""
