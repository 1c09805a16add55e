#!/usr/bin/env python3
"""A department system in Python: runs a 告知承诺 case against a govflow server.

Each agency uses its own bearer token, as separate department systems would. The
stubs are generated from ../../proto at start (grpcio-tools), so nothing generated
is kept in the repository.

    python3 -m venv venv && venv/bin/pip install -r examples/python/requirements.txt
    venv/bin/python examples/python/gaozhi_client.py --server 127.0.0.1:50051 \\
        --credentials govflow-data/credentials.toml

Exit status 0 when every step answered as expected, 1 otherwise (naming the step).
"""

import argparse
import atexit
import importlib
import pathlib
import shutil
import sys
import tempfile
import tomllib

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_tools import protoc

PROTO = pathlib.Path(__file__).resolve().parents[2] / "proto"
PLATFORM, APPROVAL = "hebei.sjz.platform", "hebei.sjz.approval"
HOUSING, TAX = "hebei.sjz.housing", "hebei.sjz.tax"


def stubs():
    """Generates the Python stubs of proto/govflow/v1 into a temporary folder."""
    out = tempfile.mkdtemp(prefix="govflow-stubs-")
    # Generated once per run, so not left behind in the temporary folder.
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "govflow" / "v1").glob("*.proto"))
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    if protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}",
                    f"--grpc_python_out={out}", *files]) != 0:
        sys.exit("cannot generate the stubs from " + str(PROTO))
    sys.path.insert(0, out)
    return (importlib.import_module("govflow.v1.cases_pb2"),
            importlib.import_module("govflow.v1.cases_pb2_grpc"))


def reason(error):
    """The ErrorInfo reason govflow puts in every error status."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


class Failed(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--credentials", default="govflow-data/credentials.toml")
    parser.add_argument("--case-id", default="gz-py-1")
    args = parser.parse_args()
    cases_pb2, cases_grpc = stubs()
    with open(args.credentials, "rb") as f:
        tokens = tomllib.load(f)["tokens"]
    cases = cases_grpc.CasesServiceStub(grpc.insecure_channel(args.server))
    name = "cases/" + args.case_id

    def as_(agency):
        return [("authorization", "Bearer " + tokens[agency])]

    def struct(values):
        s = struct_pb2.Struct()
        s.update(values)
        return s

    def fire(agency, event, payload=None, request_id=None):
        request = cases_pb2.FireEventRequest(
            request_id=request_id or f"{args.case_id}-{event}", case=name, event=event,
            payload=struct(payload or {}))
        case = cases.FireEvent(request, metadata=as_(agency)).case
        print(f"{agency:>20} fired {event:<8} -> {case.state} (step {case.sequence})")
        return case

    def refused(what, code, why, call):
        try:
            call()
        except grpc.RpcError as e:
            if e.code() != code or reason(e) != why:
                raise Failed(f"{what}: {e.code()} [{reason(e)}] {e.details()}, "
                             f"expected {code} [{why}]")
            print(f"{'':>20} {what}: {e.code().name} [{why}]")
            return
        raise Failed(f"{what}: answered, expected {code}")

    created = cases.CreateCase(cases_pb2.CreateCaseRequest(
        request_id=args.case_id + "-start", case_id=args.case_id, workflow="gaozhi_chengnuo",
        bindings={"approval": APPROVAL, "supervision": HOUSING, "registration": "hebei.sjz.amr"},
        variables=struct({"permit_id": "SGXK-1", "permit_name": "建筑工程施工许可",
                          "enterprise_name": "石家庄某置业有限公司",
                          "credit_code": "91130102MA0HOUS001"})), metadata=as_(PLATFORM)).case
    print(f"{PLATFORM:>20} started  {created.id} -> {created.state}")
    fire(PLATFORM, "apply")
    fire(APPROVAL, "inform", {"conditions": ["已取得建设工程规划许可证"],
                              "supervision_rules": "领证后30日内核查",
                              "breach_consequences": "撤销许可", "model_letter": "示范文本"})
    # The commitment comes with the materials asked for (a non-empty list): without them it is
    # refused.
    commitment = {"kind": "conditions_met", "commitment_text": "承诺已具备条件"}
    refused("a commitment without materials", grpc.StatusCode.INVALID_ARGUMENT, "invalid-payload",
            lambda: fire(PLATFORM, "commit", commitment,
                         request_id=args.case_id + "-commit-without-materials"))
    fire(PLATFORM, "commit", {**commitment, "materials": ["告知承诺书（已签章）", "建设工程规划许可证"]})
    refused("the platform grants", grpc.StatusCode.PERMISSION_DENIED, "role-not-allowed",
            lambda: fire(PLATFORM, "grant", request_id=args.case_id + "-grant-by-platform"))
    refused("another agency reads", grpc.StatusCode.NOT_FOUND, "case-not-found",
            lambda: cases.GetCase(cases_pb2.GetCaseRequest(name=name), metadata=as_(TAX)))
    refused("no token", grpc.StatusCode.UNAUTHENTICATED, "no-credential",
            lambda: cases.GetCase(cases_pb2.GetCaseRequest(name=name)))
    granted = fire(APPROVAL, "grant")
    again = fire(APPROVAL, "grant")
    if (again.sequence, again.state) != (granted.sequence, granted.state):
        raise Failed("a retry of grant moved the case")
    inbox = cases.ListInbox(cases_pb2.ListInboxRequest(), metadata=as_(HOUSING))
    mine = [item for item in inbox.items if getattr(item, "case").id == args.case_id]
    if not mine:
        raise Failed(f"the case is not in the supervising agency's inbox: {inbox}")
    print(f"{HOUSING:>20} inbox has {args.case_id}, may fire {', '.join(mine[0].events)}")
    steps = []
    stream = cases.WatchEvents(cases_pb2.WatchEventsRequest(cursor="0"), metadata=as_(HOUSING))
    for event in stream:
        if event.history_entry.case_id == args.case_id:
            steps.append(event.history_entry.event)
        if len(steps) == granted.sequence:
            stream.cancel()
            break
    print(f"{HOUSING:>20} watched {' → '.join(steps)}")
    if steps[-1] != "grant":
        raise Failed(f"the watch ended with {steps}")


if __name__ == "__main__":
    try:
        main()
    except Failed as failure:
        sys.exit(f"FAILED: {failure}")
    except grpc.RpcError as e:
        sys.exit(f"FAILED: {e.code()} [{reason(e)}] {e.details()}")
