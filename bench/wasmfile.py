"""Reading a wasm module's code section: the size of each function body (benchmark 6's
analysis, bench/compile_cost.py, and tests/bench/test_wasm_functions.py)."""


def leb128(data, i):
    """An unsigned LEB128 number at data[i]: (value, index after it)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def function_sizes(path):
    """The size in bytes of each function body in the module's code section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\0asm":
        raise ValueError(f"{path} is not a wasm module")
    i = 8
    while i < len(data):
        section, i = data[i], i + 1
        size, i = leb128(data, i)
        if section == 10:  # code
            count, j = leb128(data, i)
            sizes = []
            for _ in range(count):
                body, j = leb128(data, j)
                sizes.append(body)
                j += body
            if j != i + size:
                raise ValueError(f"{path}: the code section's functions do not add up to its size")
            return sizes
        i += size
    raise ValueError(f"{path} has no code section")
