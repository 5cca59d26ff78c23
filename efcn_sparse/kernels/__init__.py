"""Kernels per backend, all with one contract (see ``reference``):

* ``forward(x, values, bias, crow_ptr, col_idx, row_idx, M) -> y [B, M]``
* ``grad_input(dy, values, ccol_ptr, t_row_idx, t_perm, N) -> dx [B, N]``
* ``grad_weight(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC) -> dW [nnzb, BR, BC]``
* optional ``grad_weight_acc(out, dy, x, row_idx, col_idx, mask_ids, mask_patterns)``: ``out += dW``
  in place, without a ``[nnzb, BR, BC]`` temporary (``ops`` falls back to ``out += grad_weight(...)``)

``reference`` is pure PyTorch; ``cpu`` and ``cuda`` call the C++/CUDA extension; ``triton``
holds the Triton kernels. ``efcn_sparse.backends`` chooses among them.
"""
