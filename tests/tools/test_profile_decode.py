"""tools/profile_decode.py: the HLO-text parsing that names each traced op (the trace itself needs
the issue-sized model; `python -m tools.profile_decode` runs it)."""

from tools.profile_decode import group_of, op_table

HLO = """
  %dot.3 = f32[1,8192]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ynn_fusion.7 = f32[8,8192]{1,0} fusion(%x, %w), kind=kCustom, calls=%f, metadata={op_name="jit(advance)/while/body/btd,dv->btv/dot_general" stack_frame_id=217}
  ROOT %gather_bitcast_fusion.1 = f32[4,512,256]{2,1,0} fusion(%p, %i), kind=kLoop, metadata={op_name="jit(advance)/while/body/cond/branch_1_fun/gather" stack_frame_id=1}
"""


def test_op_table_and_groups():
    ops = op_table(HLO)
    assert ops["dot.3"] == ("f32[1,8192]{1,0}", "")
    assert ops["ynn_fusion.7"] == ("f32[8,8192]{1,0}", "jit(advance)/while/body/btd,dv->btv/dot_general")
    assert ops["gather_bitcast_fusion.1"][0] == "f32[4,512,256]{2,1,0}"
    assert group_of(ops["ynn_fusion.7"][1]) == "btd,dv->btv"
    assert group_of(ops["gather_bitcast_fusion.1"][1]) == "gather"
    assert group_of("") == "other"
