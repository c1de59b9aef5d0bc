"""tools/profile_decode.py: the HLO-text parsing that names each traced op (the trace itself needs
the issue-sized model; `python -m tools.profile_decode` runs it)."""

from tools.profile_decode import group_of, kind_of, op_table, step_breakdown

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


def _ev(op, ts, dur, tid=1):
    return {"ph": "X", "ts": ts, "dur": dur, "tid": tid, "args": {"hlo_op": op}}


def test_step_breakdown_takes_the_fastest_step_and_unnests_branches():
    """Two steps cut at the head dot ``dot.0``; the second (30 us) is the fastest. Its conditional
    (10 us) holds a branch dot (8 us): 2 us are the conditional's own, 8 count as dot. 6 us of the
    30 run no op (gaps). Catches the slowest or a mean step taken, a branch's time counted twice."""
    events = [
        *(_ev("dot.0", 0, 10), _ev("cond.1", 12, 20), _ev("dot.5", 14, 15), _ev("copy.2", 33, 2)),  # step 1: 100 us
        *(_ev("dot.0", 100, 10), _ev("cond.1", 110, 10), _ev("dot.5", 111, 8)),  # step 2: 30 us
        *(_ev("copy.2", 121, 1), _ev("add_fusion.9", 122, 3), _ev("dot.0", 130, 10)),
    ]
    kinds = {e["args"]["hlo_op"]: kind_of(e["args"]["hlo_op"]) for e in events}
    row = step_breakdown(events, "dot.0", kinds)
    assert row == {
        "fastest_step_us": 30,
        "ops_run": 5,
        "threads": 1,
        "conditional_us": 2,
        "copy_us": 1,
        "dot_us": 18,
        "other_us": 3,
        "gaps_us": 6,
    }
    assert kind_of("ynn_fusion.3") == "ynn_fusion"
