"""Modules moved to ``imaging/`` and ``aijack/`` stay reachable at their old paths."""

import deel_lipdp_ext
from deel_lipdp_ext import accounting, aijack
from deel_lipdp_ext.aijack import dpsgd_manager, moment_accountant
from deel_lipdp_ext.imaging import metrics as imaging_metrics


def test_old_module_paths_resolve_to_the_moved_modules():
    from deel_lipdp_ext import metrics

    assert metrics is imaging_metrics
    assert deel_lipdp_ext.dpsgd_manager is dpsgd_manager
    assert deel_lipdp_ext.dpsgd_manager.DPSGDManager is aijack.DPSGDManager


def test_accounting_still_exports_the_moment_accountant():
    accountant_cls = moment_accountant.GeneralMomentAccountant
    assert accounting.GeneralMomentAccountant is accountant_cls
    assert aijack.GeneralMomentAccountant is accountant_cls
