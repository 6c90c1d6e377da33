"""The 15 reconciliation functions of docs/functions.md, one module per family."""
from .basic import (constant_eye_reconciliation, constant_reconciliation, identity_reconciliation,
                    one_reconciliation, zero_reconciliation)
from .hypernet import hypernet_reconciliation, random_matrix_hypernet_reconciliation
from .kron import dual_lphm_reconciliation, hm_reconciliation, lphm_reconciliation
from .lowrank import lorr_reconciliation, random_matrix_adaption_reconciliation
from .masking import masking_reconciliation
from .padding import duplicated_diagonal_padding_reconciliation, duplicated_padding_reconciliation

ALL = (
    constant_reconciliation, zero_reconciliation, one_reconciliation, constant_eye_reconciliation,
    identity_reconciliation, masking_reconciliation, duplicated_padding_reconciliation,
    duplicated_diagonal_padding_reconciliation, lorr_reconciliation, hm_reconciliation,
    lphm_reconciliation, dual_lphm_reconciliation, hypernet_reconciliation,
    random_matrix_adaption_reconciliation, random_matrix_hypernet_reconciliation,
)
