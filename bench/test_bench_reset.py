"""Fast reset (``vm.reset_to``) for 1, 50 and 500 dirty pages, as multiples of one vCPU
ioctl (KVM_GET_REGS) measured in the same run, with where the time of one reset goes and
what its unavoidable steps cost on this host. Ratios go to ``extra_info``; nothing here
asserts a time."""

from hvjit.benchmarks.reset import measure


def test_reset_cost_against_one_vcpu_ioctl(benchmark, kvm_session):
    result = measure(kvm_session, (1, 50, 500), rounds=60)
    for row in result["rows"]:
        assert row["pages_copied"] >= row["dirty_pages"]  # every page the guest wrote came back
        print(f"\n{row['dirty_pages']:4d} dirty pages ({row['tracking']}): reset {row['reset_us']:7.1f} us "
              f"({row['reset_over_ioctl']:.1f} warm / {row['reset_over_cold_ioctl']:.1f} cold ioctls), "
              f"CPL3-only reset {row['reset_user_us']:7.1f} us ({row['reset_user_over_ioctl']:.1f} warm / "
              f"{row['reset_user_over_cold_ioctl']:.1f} cold ioctls); KVM_GET_REGS {row['get_regs_us']:.1f} us "
              f"back to back, {row['get_regs_cold_us']:.1f} us right after a guest run; "
              f"guest run (vm.run) {row['guest_run_us']:.0f} us")
        for part in ("breakdown_us", "floor_us"):
            for step, us in row.get(part, {}).items():
                print(f"      {step:50s} {us:7.1f}" + ("" if "%" in step else " us"))
    benchmark.extra_info.update(result)
    benchmark.pedantic(lambda: None, rounds=1)
