"""domain.cmdline: every option form StratoVirt documents, and every refusal, by name."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.cmdline import OPTIONS, UNSUPPORTED_OPTIONS, parse_cmdline
from domain.cmdline_devices import DRIVERS
from domain.config import (
    ACCEL_KVM,
    ACCEL_TEST,
    MAX_VCPUS,
    MICROVM_MAX_BLK,
    MICROVM_MAX_NET,
    ChardevConfig,
    CpuTopology,
    DriveConfig,
    NetdevConfig,
    SerialConfig,
)
from domain.errors import ConfigError

KERNEL = ["-kernel", "/boot/vmlinux"]
Q35 = "-machine q35 "


def parse(cmd: str, kernel: bool = True):
    return parse_cmdline(shlex.split(cmd) + (KERNEL if kernel else []))


def refuse(cmd: str, option: str, *fragments: str, kernel: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(cmd, kernel)
    err = info.value
    text = str(err)
    assert "\n" not in text
    assert err.option == option, text
    assert text.startswith(f"{option}: ")
    for fragment in fragments:
        assert fragment in text, text
    return err


# --- the manual's own command lines -------------------------------------------------------


def test_manual_microvm_snapshot_restore_command_line():
    cfg = parse(
        "-machine microvm -smp 1 -m 1024 "
        "-append 'console=ttyS0 pci=off reboot=k quiet panic=1 root=/dev/vda' "
        "-drive file=/path/to/rootfs,id=rootfs,readonly=off,direct=off "
        "-device virtio-blk-device,drive=rootfs -qmp unix:/path/to/another_socket,server,nowait "
        "-serial stdio -incoming file:/path/to/template"
    )
    assert cfg.machine.type == "microvm"
    assert cfg.memory.size == 1 << 30
    assert cfg.append == "console=ttyS0 pci=off reboot=k quiet panic=1 root=/dev/vda"
    assert cfg.drives == (DriveConfig(id="rootfs", file="/path/to/rootfs", readonly=False, direct=False),)
    assert cfg.devices[0].driver == "virtio-blk-device" and cfg.devices[0].drive == "rootfs"
    assert cfg.devices[0].id is None and cfg.devices[0].addr is None
    assert cfg.qmp == ("/path/to/another_socket",)
    assert cfg.serial == SerialConfig(backend="stdio")
    assert cfg.incoming == "file:/path/to/template"


def test_manual_q35_migration_destination_command_line():
    cfg = parse(
        "-machine q35 -append 'console=ttyS0 root=/dev/vda' "
        "-drive file=path/to/rootfs,id=rootfs,readonly=off,direct=off "
        "-device virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0 "
        "-qmp unix:path/to/socket2,server,nowait -serial stdio -incoming tcp:192.168.0.1:4446"
    )
    assert cfg.machine.type == "q35"
    dev = cfg.devices[0]
    assert (dev.driver, dev.id, dev.bus, dev.addr) == ("virtio-blk-pci", "rootfs", "pcie.0", 0)
    assert cfg.incoming == "tcp:192.168.0.1:4446"


def test_defaults_without_options():
    cfg = parse("")
    assert cfg.machine.type == "microvm"
    assert cfg.machine.accel is None  # the CLI picks kvm or test later
    assert cfg.machine.hidden_cpu_features == ()
    assert cfg.smp == CpuTopology()
    assert cfg.memory.size == 256 << 20 and cfg.memory.dump_guest_core and not cfg.memory.prealloc
    assert cfg.serial == SerialConfig(backend="none")
    assert cfg.kernel == "/boot/vmlinux" and cfg.append == "" and cfg.initrd is None
    assert (cfg.qmp, cfg.incoming, cfg.logfile, cfg.pidfile, cfg.name, cfg.uuid) == ((), None, None, None, None, None)
    assert not cfg.daemonize


# --- argv shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(UNSUPPORTED_OPTIONS))
def test_stratovirt_options_pystrato_lacks_are_refused_by_name(option):
    refuse(f"{option} x", option, "not supported by pystrato yet")


@pytest.mark.parametrize("option", ["-M", "-enable-kvm", "-nic", "-x", "-"])
def test_unknown_options(option):
    refuse(f"{option} q35", option, "unknown option")


def test_double_dash_gets_a_hint():
    refuse("--machine q35", "--machine", "unknown option", "-machine")


@pytest.mark.parametrize("option", sorted(o for o, k in OPTIONS.items() if k in ("value", "repeated")))
def test_options_needing_a_value_at_the_end(option):
    with pytest.raises(ConfigError) as info:
        parse_cmdline([option])
    assert info.value.option == option and "needs a value" in str(info.value)


@pytest.mark.parametrize(
    "cmd,option",
    [("-m 512 -m 1024", "-m"), ("-machine q35 -machine microvm", "-machine"),
     ("-smp 1 -smp 2", "-smp"), ("-daemonize -daemonize", "-daemonize"), ("-D -D", "-D"),
     ("-serial stdio -serial none", "-serial"), ("-name a -name b", "-name"),
     ("-cpu host -cpu host", "-cpu"), ("-accel kvm -accel kvm", "-accel")],
)
def test_single_options_given_twice(cmd, option):
    refuse(cmd, option, "given more than once")


def test_kernel_given_twice():
    with pytest.raises(ConfigError, match="^-kernel: given more than once$"):
        parse_cmdline(KERNEL + KERNEL)


@pytest.mark.parametrize(
    "cmd,option,fragment",
    [("stray", "stray", "unexpected argument: options start with '-'"), ("-m 512 1024", "-m", "'1024' after -m"),
     ("-daemonize yes", "-daemonize", "'yes' after -daemonize")],
)
def test_stray_arguments(cmd, option, fragment):
    refuse(cmd, option, "unexpected argument", fragment)


def test_a_value_may_start_with_a_dash():
    assert parse("-name -odd-").name == "-odd-"


# --- -machine / -accel / -cpu -------------------------------------------------------------


@pytest.mark.parametrize(
    "value,kind,dump,share,accel",
    [("microvm", "microvm", True, False, None), ("q35", "q35", True, False, None),
     ("Q35", "q35", True, False, None), ("type=q35", "q35", True, False, None),
     ("type=microvm,dump-guest-core=off,mem-share=on", "microvm", False, True, None),
     ("microvm,dump-guest-core=on,mem-share=off,usb=off", "microvm", True, False, None),
     ("microvm,accel=kvm", "microvm", True, False, ACCEL_KVM),
     ("q35,accel=test", "q35", True, False, ACCEL_TEST)],
)
def test_machine_forms(value, kind, dump, share, accel):
    cfg = parse(f"-machine {value}")
    assert (cfg.machine.type, cfg.memory.dump_guest_core, cfg.memory.mem_share, cfg.machine.accel) == (
        kind, dump, share, accel)


@pytest.mark.parametrize(
    "value,fragment",
    [("virt", "'virt' is not a machine type"), ("pc", "is not a machine type"),
     ("none", "machine type none is not supported by pystrato yet"),
     ("q35,type=q35", "given twice"), ("dump-guest-core=on", "needs a machine type"),
     ("microvm,usb=on", "only usb=off"), ("microvm,accel=tcg", "'tcg' is not an accelerator"),
     ("microvm,mem-share=maybe", "mem-share='maybe' is not a switch"),
     ("microvm,gic-version=3", "unknown parameter 'gic-version'"),
     ("microvm,foo", "unknown parameter 'foo'"), ("microvm,,", "empty parameter"),
     ("type=", "empty value"), ("", "needs a value"), ("microvm,=x", "has no name"),
     ("microvm,mem-share", "needs a value (mem-share=...)"),
     ("microvm,mem-share=on,mem-share=off", "'mem-share' is given twice")],
)
def test_machine_refusals(value, fragment):
    refuse(f"-machine '{value}'", "-machine", fragment)


@pytest.mark.parametrize("value,accel", [("kvm", ACCEL_KVM), ("kvm:tcg", ACCEL_KVM), ("test", ACCEL_TEST)])
def test_accel_forms(value, accel):
    assert parse(f"-accel {value}").machine.accel == accel


@pytest.mark.parametrize(
    "cmd,fragment",
    [("-accel tcg", "'tcg' is not an accelerator"), ("-accel kvm,thread=single", "unknown parameter 'thread'"),
     ("-accel accel=kvm", "needs an accelerator"),
     ("-machine microvm,accel=kvm -accel test", "test contradicts -machine accel=kvm")],
)
def test_accel_refusals(cmd, fragment):
    refuse(cmd, "-accel", fragment)


def test_accel_may_repeat_the_machine_accel():
    assert parse("-machine microvm,accel=test -accel test").machine.accel == ACCEL_TEST


@pytest.mark.parametrize(
    "value,hidden",
    [("host", ()), ("host,-avx2", ("avx2",)), ("host,-arch-capabilities,-AVX2", ("arch-capabilities", "avx2")),
     ("host,avx512f=off,-sse4.2", ("avx512f", "sse4.2")), ("host,-pcid,pcid=off", ("pcid",))],
)
def test_cpu_forms(value, hidden):
    assert parse(f"-cpu {value}").machine.hidden_cpu_features == hidden


@pytest.mark.parametrize(
    "value,fragment",
    [("max", "'max' is not a CPU model"), ("qemu64,-avx", "'qemu64' is not a CPU model"),
     ("host,+avx2", "enabling 'avx2' is not supported by pystrato yet"),
     ("host,avx2=on", "enabling 'avx2'"), ("host,avx2", "'avx2' is not -feature or feature=off"),
     ("host,pmu=off", "pmu= is not supported by pystrato yet"), ("host,sve=on", "sve="),
     ("host,-", "'' is not a CPU feature name"), ("host,-a$b", "not a CPU feature name"),
     ("host,", "'' is not -feature"), ("", "'' is not a CPU model")],
)
def test_cpu_refusals(value, fragment):
    refuse(f"-cpu '{value}'", "-cpu", fragment)


# --- -smp ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,topology",
    [("4", (4, 4, 4, 1, 1, 1, 1)), ("cpus=4", (4, 4, 4, 1, 1, 1, 1)),
     ("4,sockets=2", (4, 4, 2, 1, 1, 2, 1)), ("4,cores=2", (4, 4, 2, 1, 1, 2, 1)),
     ("4,sockets=2,cores=2", (4, 4, 2, 1, 1, 2, 1)), ("4,threads=2", (4, 4, 2, 1, 1, 1, 2)),
     ("2,maxcpus=4", (2, 4, 4, 1, 1, 1, 1)), ("2,maxcpus=8,sockets=2,threads=2", (2, 8, 2, 1, 1, 2, 2)),
     ("8,sockets=2,dies=2,clusters=2", (8, 8, 2, 2, 2, 1, 1)), ("1,sockets=0,cores=0", (1, 1, 1, 1, 1, 1, 1)),
     ("2,sockets=2,cores=1,threads=1", (2, 2, 2, 1, 1, 1, 1)), ("254", (254, 254, 254, 1, 1, 1, 1)),
     ("2,sockets=2,cores=2,threads=2", (2, 8, 2, 1, 1, 2, 2)), ("cpus=1,maxcpus=254", (1, 254, 254, 1, 1, 1, 1)),
     ("4,sockets=2,cores=3,threads=1", (4, 6, 2, 1, 1, 3, 1))],
)
def test_smp_topology_derivation(value, topology):
    assert parse(f"-smp {value}").smp == CpuTopology(*topology)


@pytest.mark.parametrize(
    "value,fragment",
    [("0", "cpus=0 is out of range [1, 254]"), ("255", "cpus=255 is out of range [1, 254]"),
     ("4,maxcpus=2", "maxcpus (2) must be in [cpus (4), 254]"),
     ("4,maxcpus=255", "maxcpus=255 is out of range"),
     ("4,sockets=3", "sockets (3) * dies (1) * clusters (1) * cores (1) * threads (1) = 3 must equal maxcpus (4)"),
     ("4,sockets=2,cores=3", "threads (0) = 0 must equal maxcpus (4)"),
     ("4,maxcpus=4,sockets=2,cores=3,threads=1", "= 6 must equal maxcpus (4)"),
     ("4,sockets=8", "cores (0)"),
     ("200,sockets=100,cores=100,threads=1", "maxcpus (10000) must be in"),
     ("a", "cpus='a' is not a decimal number"), ("0x4", "not a decimal number"), ("-1", "not a decimal"),
     ("+4", "not a decimal"), ("4,cpus=4", "cpus is given twice"), ("maxcpus=4", "needs a vCPU count"),
     ("4,dies=0", "dies=0 is out of range [1, 254]"), ("4,clusters=0", "clusters=0"),
     ("4,books=1", "unknown parameter 'books'"), ("4,threads", "needs a value"), ("", "needs a value"),
     ("9" * 40, "not a decimal number")],
)
def test_smp_refusals(value, fragment):
    refuse(f"-smp '{value}'", "-smp", fragment)


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,size",
    [("1024", 1 << 30), ("128", 128 << 20), ("1G", 1 << 30), ("2g", 2 << 30), ("512M", 512 << 20),
     ("512m", 512 << 20), ("262144K", 256 << 20), ("262144k", 256 << 20), ("size=2G", 2 << 30),
     ("size=300", 300 << 20), ("512G", 512 << 30), ("131076K", (128 << 20) + 4096)],
)
def test_memory_forms(value, size):
    assert parse(f"-m {value}").memory.size == size


@pytest.mark.parametrize(
    "value,fragment",
    [("127", "outside [128 MiB, 512 GiB]"), ("513G", "outside"), ("0", "outside"),
     ("131073K", "not a multiple of 4 KiB"), ("1T", "is not a size"), ("1Gg", "is not a size"),
     ("G1", "is not a size"), ("1.5G", "is not a size"), ("abc", "is not a size"),
     ("1024,maxmem=2G", "parameter 'maxmem' is not supported by pystrato yet"),
     ("1024,size=1G", "size is given twice"), ("size=", "empty value"), ("slots=2", "needs a size"),
     ("9" * 30, "is not a size")],
)
def test_memory_refusals(value, fragment):
    refuse(f"-m '{value}'", "-m", fragment)


def test_mem_path_and_prealloc():
    cfg = parse("-mem-path /dev/hugepages/vm -mem-prealloc")
    assert cfg.memory.mem_path == "/dev/hugepages/vm" and cfg.memory.prealloc
    refuse("-mem-path ''", "-mem-path", "path is empty")
    refuse("-mem-prealloc on", "-mem-prealloc", "unexpected argument 'on'")


# --- boot -------------------------------------------------------------------------------------


def test_kernel_initrd_append():
    cfg = parse("-initrd /boot/initrd.img -append 'console=ttyS0 quiet' -append panic=1")
    assert (cfg.initrd, cfg.append) == ("/boot/initrd.img", "console=ttyS0 quiet panic=1")


def test_append_gathers_bare_words_like_stratovirt():
    assert parse("-append console=ttyS0 reboot=k -smp 2").append == "console=ttyS0 reboot=k"
    assert parse("-append ''").append == ""


def test_kernel_is_required():
    refuse("-machine q35", "-kernel", "a kernel is required for the q35 machine", kernel=False)
    refuse("", "-kernel", "required", kernel=False)


@pytest.mark.parametrize("option", ["-kernel", "-initrd", "-pidfile"])
def test_path_shapes(option):
    kernel = option != "-kernel"
    refuse(f"{option} ''", option, "path is empty", kernel=kernel)
    refuse(f"{option} {'a' * 4097}", option, "4097 bytes long, longer than 4096", kernel=kernel)


def test_path_with_nul_is_refused():
    with pytest.raises(ConfigError, match="NUL"):
        parse_cmdline(["-kernel", "/boot/a\x00b"])


# --- -drive -----------------------------------------------------------------------------------


BLK = "-device virtio-blk-device,drive=d0"


@pytest.mark.parametrize(
    "value,drive",
    [("id=d0,file=/img", DriveConfig(id="d0", file="/img")),
     ("file=/img,id=d0,readonly=on,direct=off", DriveConfig(id="d0", file="/img", readonly=True, direct=False)),
     ("id=d0,file=/img,readonly=true,direct=false,format=raw,if=none",
      DriveConfig(id="d0", file="/img", readonly=True, direct=False)),
     ("id=d0,file=/img,readonly=yes,direct=no", DriveConfig(id="d0", file="/img", readonly=True, direct=False)),
     ("id=d0,file=/a=b", DriveConfig(id="d0", file="/a=b"))],
)
def test_drive_forms(value, drive):
    assert parse(f"-drive {value} {BLK}").drives == (drive,)


def test_drive_serial_is_handed_to_its_device():
    cfg = parse(f"-drive id=d0,file=/img,serial=SN42 {BLK}")
    assert cfg.devices[0].serial == "SN42"
    cfg = parse("-drive id=d0,file=/img,serial=SN42 -device virtio-blk-device,drive=d0,serial=SN42")
    assert cfg.devices[0].serial == "SN42"
    refuse("-drive id=d0,file=/img,serial=A -device virtio-blk-device,drive=d0,serial=B",
           "-device", "drive 'd0' has serial 'A' but its device says 'B'")


@pytest.mark.parametrize(
    "value,fragment",
    [("file=/img", "id= is required"), ("id=d0", "file= is required"),
     ("id=d0,file=/img,format=qcow2", "format=qcow2 is not supported by pystrato yet (only raw)"),
     ("id=d0,file=/img,format=vmdk", "'vmdk' is not a disk format"),
     ("id=d0,file=/img,if=pflash,unit=0", "if=pflash is not supported by pystrato yet"),
     ("file=/fw.fd,if=pflash", "if=pflash is not supported"),
     ("id=d0,file=/img,if=virtio", "'virtio' is not a drive interface"),
     ("id=d0,file=/img,readonly=maybe", "readonly='maybe' is not a switch"),
     ("id=d0,file=/img,direct=1", "direct='1' is not a switch"),
     ("id=d0,file=/img,aio=native", "parameter 'aio' is not supported by pystrato yet"),
     ("id=d0,file=/img,throttling.iops-total=200", "'throttling.iops-total' is not supported"),
     ("id=d0,file=/img,cache=none", "unknown parameter 'cache'"),
     ("id=d0,file=/img,serial=" + "x" * 21, "serial is longer than 20"),
     ("id=" + "x" * 256 + ",file=/img", "id is longer than 255"), ("id=d0,file=", "empty value"),
     ("id=d0,file=/img,readonly", "needs a value"), ("rootfs,id=d0,file=/img", "unknown parameter 'rootfs'")],
)
def test_drive_refusals(value, fragment):
    refuse(f"-drive '{value}' {BLK}", "-drive", fragment)


# --- -netdev ----------------------------------------------------------------------------------


NIC = "-device virtio-net-device,netdev=n0"


@pytest.mark.parametrize(
    "value,netdev",
    [("tap,id=n0,ifname=tap0", NetdevConfig(id="n0", ifname="tap0")),
     ("tap,id=n0,fd=7", NetdevConfig(id="n0", fd=7)),
     ("tap,id=n0,ifname=tap0,vhost=on,queues=4", NetdevConfig(id="n0", ifname="tap0", vhost=True, queues=4)),
     ("tap,ifname=tap0,id=n0,vhost=off,queues=1", NetdevConfig(id="n0", ifname="tap0"))],
)
def test_netdev_forms(value, netdev):
    assert parse(f"-netdev {value} {NIC}").netdevs == (netdev,)


@pytest.mark.parametrize(
    "value,fragment",
    [("tap,id=n0", "a tap needs ifname= or fd="), ("tap,ifname=tap0", "id= is required"),
     ("user,id=n0", "'user' is not a netdev type"), ("vhost-user,id=n0,chardev=c", "vhost-user is not supported"),
     ("id=n0,ifname=tap0", "needs a type first"), ("tap,id=n0,ifname=tap0,fd=3", "exclude each other"),
     ("tap,id=n0,fd=-1", "fd='-1' is not a number"), ("tap,id=n0,fd=x", "not a number"),
     ("tap,id=n0,ifname=tap0,queues=0", "queues=0 is out of range [1, 16]"),
     ("tap,id=n0,ifname=tap0,queues=17", "queues=17 is out of range"),
     ("tap,id=n0,fd=3,queues=2", "queues>1 needs fds="),
     ("tap,id=n0,ifname=a-very-long-tap-name", "is not a Linux interface name"),
     ("tap,id=n0,ifname=a/b", "not a Linux interface name"),
     ("tap,id=n0,fds=3:4", "parameter 'fds' is not supported by pystrato yet"),
     ("tap,id=n0,ifname=tap0,vhostfd=5", "'vhostfd' is not supported"),
     ("tap,id=n0,ifname=tap0,script=/x", "unknown parameter 'script'"),
     ("tap,id=n0,ifname=tap0,vhost=maybe", "vhost='maybe' is not a switch")],
)
def test_netdev_refusals(value, fragment):
    refuse(f"-netdev '{value}' {NIC}", "-netdev", fragment)


# --- -chardev ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,chardev",
    [("stdio,id=c0", ChardevConfig(id="c0", backend="stdio")),
     ("pty,id=c0", ChardevConfig(id="c0", backend="pty")),
     ("file,id=c0,path=/tmp/out", ChardevConfig(id="c0", backend="file", path="/tmp/out")),
     ("socket,id=c0,path=/tmp/s,server,nowait",
      ChardevConfig(id="c0", backend="socket", path="/tmp/s", server=True, nowait=True)),
     ("socket,id=c0,path=/tmp/s", ChardevConfig(id="c0", backend="socket", path="/tmp/s"))],
)
def test_chardev_forms(value, chardev):
    assert parse(f"-chardev {value}").chardevs == (chardev,)


@pytest.mark.parametrize(
    "value,fragment",
    [("stdio", "id= is required"), ("udp,id=c0", "'udp' is not a chardev backend"),
     ("id=c0", "needs a backend type first"), ("file,id=c0", "path= is required"),
     ("socket,id=c0", "path= is required (unix socket)"),
     ("socket,id=c0,host=127.0.0.1,port=9090,server,nowait", "tcp sockets (host=, port=) are not supported"),
     ("socket,id=c0,path=/tmp/s,server=on", "'server' is a bare switch and takes no value"),
     ("socket,id=c0,path=/" + "s" * 107, "108 bytes long, longer than 107"),
     ("stdio,id=c0,path=/x", "unknown parameter 'path'"), ("pty,id=c0,mux=on", "unknown parameter 'mux'")],
)
def test_chardev_refusals(value, fragment):
    refuse(f"-chardev '{value}'", "-chardev", fragment)


# --- -device ----------------------------------------------------------------------------------


def test_microvm_devices():
    cfg = parse(
        "-drive id=d0,file=/a -drive id=d1,file=/b -netdev tap,id=n0,ifname=tap0 "
        "-chardev socket,id=con,path=/tmp/con,server,nowait "
        "-device virtio-blk-device,drive=d0,id=blk0,serial=S1 -device virtio-blk-device,drive=d1,addr=0x3 "
        "-device virtio-net-device,netdev=n0,id=net0,mac=52:54:00:AB:cd:01,addr=1 "
        "-device virtio-balloon-device,deflate-on-oom=true,free-page-reporting=on "
        "-device virtio-serial-device,id=vs0 -device virtconsole,id=console0,chardev=con,nr=0"
    )
    blk0, blk1, net, balloon, vserial, console = cfg.devices
    assert (blk0.id, blk0.drive, blk0.serial, blk0.addr) == ("blk0", "d0", "S1", None)
    assert (blk1.drive, blk1.addr) == ("d1", 3)
    assert (net.netdev, net.mac, net.addr) == ("n0", "52:54:00:ab:cd:01", 1)
    assert balloon.deflate_on_oom and balloon.free_page_reporting
    assert vserial.driver == "virtio-serial-device"
    assert (console.id, console.chardev) == ("console0", "con")


def test_q35_devices():
    cfg = parse(
        Q35 + "-drive id=d0,file=/a -drive id=d1,file=/b -netdev tap,id=n0,ifname=tap0 "
        "-device pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1,multifunction=on,chassis=1 "
        "-device pcie-root-port,id=pcie.2,port=2,bus=pcie.0,addr=0x1.0x1 "
        "-device virtio-blk-pci,id=blk0,drive=d0,bus=pcie.0,addr=0x2 "
        "-device virtio-blk-pci,id=blk1,drive=d1,bus=pcie.1,addr=0x0 "
        "-device virtio-net-pci,id=net0,netdev=n0,bus=pcie.2,addr=0,mac=02:00:00:00:00:01 "
        "-device virtio-balloon-pci,id=bal0,bus=pcie.0,addr=0x10.0x4,multifunction=on "
        "-device vfio-pci,id=vfio0,host=0000:1A:00.3,bus=pcie.0,addr=8.2"
    )
    rp1, rp2, blk0, blk1, net, balloon, vfio = cfg.devices
    assert (rp1.id, rp1.port, rp1.chassis, rp1.addr, rp1.multifunction) == ("pcie.1", 1, 1, 1 << 3, True)
    assert (rp2.port, rp2.addr, rp2.chassis) == (2, 1 << 3 | 1, None)
    assert (blk0.bus, blk0.addr) == ("pcie.0", 2 << 3)
    assert (blk1.bus, blk1.addr) == ("pcie.1", 0)
    assert (net.bus, net.mac) == ("pcie.2", "02:00:00:00:00:01")
    assert balloon.addr == 0x10 << 3 | 4
    assert (vfio.host, vfio.addr) == ("0000:1a:00.3", 8 << 3 | 2)


BAL = "-device virtio-balloon-device"


@pytest.mark.parametrize(
    "cmd,fragment",
    [("-device virtio-gpu-pci", "driver 'virtio-gpu-pci' is not supported by pystrato yet"),
     ("-device virtio-serial-pci,id=s", "driver 'virtio-serial-pci' is not supported"),
     ("-device e1000,netdev=n0", "unknown driver 'e1000'"),
     ("-device virtio-blk-mmio,drive=d0", "unknown driver 'virtio-blk-mmio' (on the command line it is virtio-blk-device)"),
     ("-device id=x", "needs a driver first"),
     ("-device virtio-blk-pci,id=b,drive=d0,bus=pcie.0,addr=1", "virtio-blk-pci is a PCI device: it needs -machine q35"),
     ("-device pcie-root-port,id=p,port=1,bus=pcie.0,addr=1", "needs -machine q35"),
     ("-device vfio-pci,id=v,host=0000:00:01.0,bus=pcie.0,addr=1", "needs -machine q35"),
     (Q35 + "-device virtio-blk-device,id=b,drive=d0", "virtio-mmio device: it needs -machine microvm"),
     (Q35 + "-device virtio-serial-device,id=s", "needs -machine microvm"),
     (BAL + ",bus=pcie.0", "'bus' is not allowed for virtio-mmio device virtio-balloon-device"),
     (BAL + ",addr=0x1", "'addr' is not allowed for virtio-mmio device"),
     ("-device virtio-serial-device,multifunction=on", "'multifunction' is not allowed"),
     ("-device virtio-blk-device,drive=d0,mac=52:54:00:00:00:01", "parameter 'mac' does not apply to virtio-blk-device"),
     ("-device virtconsole,id=c,chardev=x,bus=pcie.0", "parameter 'bus' does not apply to virtconsole"),
     ("-device virtio-blk-device,drive=d0,iothread=io0", "parameter 'iothread' of virtio-blk-device is not supported"),
     ("-device virtio-net-device,netdev=n0,mq=on", "'mq' of virtio-net-device is not supported"),
     ("-device virtio-blk-device,drive=d0,bogus=1", "unknown parameter 'bogus' for virtio-blk-device"),
     ("-device virtio-blk-device", "virtio-blk-device: drive= is required"),
     ("-device virtio-net-device", "netdev= is required"),
     ("-device virtconsole,chardev=c", "virtconsole: id= is required"),
     ("-device virtconsole,id=c", "chardev= is required"),
     (Q35 + "-device virtio-balloon-pci,bus=pcie.0,addr=1", "id= is required on q35"),
     (Q35 + "-device virtio-balloon-pci,id=b,addr=1", "bus= is required for virtio-balloon-pci"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0", "addr= is required"),
     (Q35 + "-device pcie-root-port,id=p,bus=pcie.0,addr=1", "port= is required"),
     (Q35 + "-device vfio-pci,id=v,bus=pcie.0,addr=1", "host= is required"),
     (Q35 + "-device pcie-root-port,id=pcie.0,port=1,bus=pcie.0,addr=1", "'pcie.0' is the root bus"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=0x20", "addr slot=32 is out of range [0, 31]"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=1.8", "addr function=8 is out of range [0, 7]"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=1.2.3", "more than slot.function"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=.5", "is not a number"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=abc", "is not a number"),
     (Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=1,multifunction=2", "multifunction='2' is not a switch"),
     (Q35 + "-device pcie-root-port,id=p,port=256,bus=pcie.0,addr=1", "port=256 is out of range [0, 255]"),
     (Q35 + "-device pcie-root-port,id=p,port=1,chassis=x,bus=pcie.0,addr=1", "chassis='x' is not a number"),
     (Q35 + "-device vfio-pci,id=v,host=1a:00.3,bus=pcie.0,addr=1", "'1a:00.3' is not a PCI address"),
     (Q35 + "-device vfio-pci,id=v,host=0000:1a:20.0,bus=pcie.0,addr=1", "not a PCI address"),
     (Q35 + "-device vfio-pci,id=v,host=0000:1a:00.8,bus=pcie.0,addr=1", "not a PCI address"),
     (Q35 + "-device vfio-pci,id=v,sysfsdev=/sys/x,bus=pcie.0,addr=1", "'sysfsdev' of vfio-pci is not supported"),
     ("-device virtio-net-device,netdev=n0,mac=52:54:00:00:00", "is not of the form xx:xx:xx:xx:xx:xx"),
     ("-device virtio-net-device,netdev=n0,mac=52-54-00-00-00-01", "not of the form"),
     ("-device virtio-net-device,netdev=n0,mac=52:54:00:00:00:0g", "not of the form"),
     ("-device virtio-net-device,netdev=n0,mac=01:00:5e:00:00:01", "is a multicast address"),
     ("-device virtio-net-device,netdev=n0,mac=ff:ff:ff:ff:ff:ff", "multicast"),
     ("-device virtio-blk-device,drive=d0,addr=6", f"addr=6 is out of range [0, {MICROVM_MAX_BLK - 1}]"),
     ("-device virtio-net-device,netdev=n0,addr=2", f"addr=2 is out of range [0, {MICROVM_MAX_NET - 1}]"),
     ("-device virtio-blk-device,drive=d0,serial=" + "s" * 21, "serial is longer than 20"),
     (BAL + ",deflate-on-oom=sure", "deflate-on-oom='sure' is not a switch"),
     ("-device virtconsole,id=c,chardev=x,nr=1", "nr= must be 0"),
     ("-device virtio-blk-device,drive=d0,id=" + "i" * 256, "id is longer than 255")],
)
def test_device_refusals(cmd, fragment):
    refuse(cmd, "-device", fragment)


# --- -qmp / -serial / -incoming / misc ----------------------------------------------------------


def test_qmp_is_repeatable():
    cfg = parse("-qmp unix:/run/a.sock,server,nowait -qmp unix:/run/b.sock,nowait,server")
    assert cfg.qmp == ("/run/a.sock", "/run/b.sock")


@pytest.mark.parametrize(
    "value,fragment",
    [("unix:/run/a.sock", "'server' is required"), ("unix:/run/a.sock,server", "'nowait' is required"),
     ("unix:/run/a.sock,nowait", "client-mode QMP is refused"),
     ("tcp:127.0.0.1:4444,server,nowait", "tcp QMP sockets are not supported by pystrato yet"),
     ("/run/a.sock,server,nowait", "is not a QMP socket"), ("unix:,server,nowait", "path is empty"),
     ("unix:/" + "q" * 107 + ",server,nowait", "longer than 107"),
     ("unix:/run/a.sock,server,nowait,iothread=io", "'iothread' is not supported by pystrato yet"),
     ("unix:/run/a.sock,server=on,nowait", "takes no value"), ("server,nowait", "'server' is not a QMP socket"),
     ("path=/q,server,nowait", "needs a socket first"), ("", "needs a value")],
)
def test_qmp_refusals(value, fragment):
    refuse(f"-qmp '{value}'", "-qmp", fragment)


def test_qmp_socket_given_twice():
    refuse("-qmp unix:/a,server,nowait -qmp unix:/a,server,nowait", "-qmp", "socket '/a' is given twice")


@pytest.mark.parametrize(
    "value,serial,chardevs",
    [("none", SerialConfig(), ()), ("stdio", SerialConfig(backend="stdio"), ()),
     ("file:/tmp/con", SerialConfig(backend="file", path="/tmp/con"), ()),
     ("file,path=/tmp/con", SerialConfig(backend="file", path="/tmp/con"), ()),
     ("pty", SerialConfig(backend="chardev", chardev="serial_chardev"), (ChardevConfig("serial_chardev", "pty"),)),
     ("socket,path=/tmp/s,server,nowait", SerialConfig(backend="chardev", chardev="serial_chardev"),
      (ChardevConfig("serial_chardev", "socket", "/tmp/s", True, True),))],
)
def test_serial_forms(value, serial, chardevs):
    cfg = parse(f"-serial {value}")
    assert (cfg.serial, cfg.chardevs) == (serial, chardevs)


def test_serial_chardev():
    cfg = parse("-chardev file,id=log,path=/tmp/log -serial chardev:log")
    assert cfg.serial == SerialConfig(backend="chardev", chardev="log")


@pytest.mark.parametrize(
    "cmd,option,fragment",
    [("-serial chardev:", "-serial", "names nothing after ':'"),
     ("-serial chardev:nope", "-serial", "chardev 'nope' is not defined by any -chardev"),
     ("-serial file:", "-serial", "path is empty"), ("-serial vc", "-serial", "'vc' is not a chardev backend"),
     ("-serial stdio,id=x", "-serial", "unknown parameter 'id'"),
     ("-serial file,path=", "-serial", "empty value"),
     ("-chardev pty,id=serial_chardev -serial pty", "-chardev", "id 'serial_chardev' is used twice")],
)
def test_serial_refusals(cmd, option, fragment):
    refuse(cmd, option, fragment)


@pytest.mark.parametrize(
    "value,incoming",
    [("file:/snap/dir", "file:/snap/dir"), ("FILE:/snap", "file:/snap"), ("tcp:192.168.0.1:4446", "tcp:192.168.0.1:4446"),
     ("tcp:0.0.0.0:65535", "tcp:0.0.0.0:65535"), ("unix:/tmp/mig.sock", "unix:/tmp/mig.sock"),
     ("tcp::4446", "tcp::4446"), ("tcp:[::1]:4446", "tcp:[::1]:4446"), ("TCP:localhost:04446", "tcp:localhost:4446")],
)
def test_incoming_forms(value, incoming):
    assert parse(f"-incoming {value}").incoming == incoming


@pytest.mark.parametrize(
    "value,fragment",
    [("tcp:192.168.0.1:0", "port=0 is out of range [1, 65535]"), ("tcp:192.168.0.1:65536", "port=65536"),
     ("tcp:192.168.0.1", "'192.168.0.1' is not HOST:PORT"), ("tcp:4446", "is not HOST:PORT"),
     ("tcp:256.1.1.1:1", "not HOST:PORT"), ("tcp:1.2.3:1", "not HOST:PORT"), ("tcp:[::g]:4446", "not HOST:PORT"),
     ("tcp:::1:4446", "not HOST:PORT"), ("tcp:a_b:1", "not HOST:PORT"), ("tcp:1.2.3.4:x", "not a decimal"),
     ("file:", "directory is empty"), ("unix:", "path is empty"), ("unix:/" + "u" * 107, "longer than 107"),
     ("fd:3", "fd: URIs are not supported by pystrato yet"), ("exec:cat /x", "exec: URIs are not supported"),
     ("defer", "is not file:DIR"), ("/snap/dir", "is not file:DIR, tcp:HOST:PORT or unix:PATH"),
     ("file:/snap,mapped=false", "parameters after the URI ('mapped=false') are not supported")],
)
def test_incoming_refusals(value, fragment):
    refuse(f"-incoming '{value}'", "-incoming", fragment)


def test_logfile_forms():
    assert parse("-D").logfile == ""
    assert parse("-D -daemonize").logfile == ""  # the next item is an option, so -D has no value
    assert parse("-D /var/log/vm.log").logfile == "/var/log/vm.log"
    refuse("-D /a /b", "-D", "unexpected argument '/b'")


def test_misc_options():
    cfg = parse("-pidfile /run/vm.pid -daemonize -name vm1 -uuid 12345678-9ABC-def0-1234-56789abcdef0")
    assert (cfg.pidfile, cfg.daemonize, cfg.name) == ("/run/vm.pid", True, "vm1")
    assert cfg.uuid == "12345678-9abc-def0-1234-56789abcdef0"


@pytest.mark.parametrize(
    "cmd,option,fragment",
    [("-uuid 1234", "-uuid", "'1234' is not a UUID"), ("-uuid 12345678-9abc-def0-1234-56789abcdefg", "-uuid", "not a UUID"),
     ("-name ''", "-name", "1 to 255 characters"), ("-name " + "n" * 256, "-name", "1 to 255")],
)
def test_misc_refusals(cmd, option, fragment):
    refuse(cmd, option, fragment)


# --- cross-checks -----------------------------------------------------------------------------


D0, D1 = "-drive id=d0,file=/a", "-drive id=d1,file=/b"
N0 = "-netdev tap,id=n0,ifname=tap0"
RP1 = "-device pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=0x1"


@pytest.mark.parametrize(
    "cmd,option,fragment",
    [(f"{D0} -drive id=d0,file=/b {BLK}", "-drive", "id 'd0' is used twice"),
     (f"{N0} -netdev tap,id=n0,ifname=tap1 {NIC}", "-netdev", "id 'n0' is used twice"),
     ("-chardev stdio,id=c -chardev pty,id=c", "-chardev", "id 'c' is used twice"),
     (f"{D0} {D1} -device virtio-blk-device,drive=d0,id=x -device virtio-blk-device,drive=d1,id=x",
      "-device", "id 'x' is used twice"),
     (f"{D0} -drive id=d1,file=/a {BLK} -device virtio-blk-device,drive=d1", "-drive",
      "drives 'd0' and 'd1' share file '/a'; a file can only be shared read-only"),
     (f"{D0} -drive id=d1,file=/a,readonly=on {BLK} -device virtio-blk-device,drive=d1", "-drive", "share file"),
     ("-device virtio-blk-device,drive=nope", "-device", "virtio-blk-device drive='nope' names no -drive"),
     (f"{D0} {BLK} {BLK}", "-device", "drive 'd0' is used by two devices"),
     (D0, "-drive", "drive 'd0' is not used by any device"),
     ("-device virtio-net-device,netdev=nope", "-device", "netdev='nope' names no -netdev"),
     (f"{N0} {NIC} {NIC}", "-device", "netdev 'n0' is used by two devices"),
     (N0, "-netdev", "netdev 'n0' is not used by any device"),
     (f"{BAL} {BAL}", "-device", "only one balloon device"),
     (Q35 + "-device virtio-balloon-pci,id=a,bus=pcie.0,addr=2 -device virtio-balloon-pci,id=b,bus=pcie.0,addr=3",
      "-device", "only one balloon"),
     ("-device virtio-serial-device -device virtio-serial-device", "-device", "only one virtio-serial-device"),
     ("-chardev pty,id=a -chardev pty,id=b -device virtio-serial-device -device virtconsole,id=x,chardev=a "
      "-device virtconsole,id=y,chardev=b", "-device", "only one virtconsole"),
     ("-chardev pty,id=c -device virtconsole,id=x,chardev=c", "-device", "needs a -device virtio-serial-device before it"),
     ("-chardev pty,id=c -device virtconsole,id=x,chardev=c -device virtio-serial-device", "-device", "before it"),
     (Q35 + "-chardev pty,id=c -device virtconsole,id=x,chardev=c", "-device", "needs a -device virtio-serial-device"),
     ("-device virtio-serial-device -device virtconsole,id=x,chardev=nope", "-device",
      "chardev 'nope' is not defined by any -chardev"),
     ("-chardev pty,id=c -device virtio-serial-device -device virtconsole,id=x,chardev=c -serial chardev:c",
      "-serial", "chardev 'c' is already in use"),
     (" ".join(f"-drive id=d{i},file=/d{i} -device virtio-blk-device,drive=d{i}" for i in range(MICROVM_MAX_BLK + 1)),
      "-device", f"{MICROVM_MAX_BLK + 1} virtio-blk-devices: microvm has {MICROVM_MAX_BLK} slots"),
     (" ".join(f"-netdev tap,id=n{i},ifname=t{i} -device virtio-net-device,netdev=n{i}" for i in range(MICROVM_MAX_NET + 1)),
      "-device", f"microvm has {MICROVM_MAX_NET} slots"),
     (f"{D0} {D1} -device virtio-blk-device,drive=d0,addr=1 -device virtio-blk-device,drive=d1,addr=0x1",
      "-device", "two virtio-blk-devices at addr=0x1"),
     (Q35 + f"{D0} -device virtio-blk-pci,id=b,drive=d0,bus=pcie.9,addr=0", "-device",
      "bus 'pcie.9' is neither pcie.0 nor a pcie-root-port defined before it"),
     (Q35 + f"{D0} -device virtio-blk-pci,id=b,drive=d0,bus=pcie.1,addr=0 {RP1}", "-device", "defined before it"),
     (Q35 + f"{RP1} -device pcie-root-port,id=pcie.2,port=2,bus=pcie.1,addr=0", "-device",
      "a pcie-root-port must be on pcie.0"),
     (Q35 + f"{RP1} {D0} -device virtio-blk-pci,id=b,drive=d0,bus=pcie.1,addr=0x1", "-device",
      "a pcie-root-port's bus has only slot 0, not addr=0x1.0"),
     (Q35 + f"{D0} -device virtio-blk-pci,id=b,drive=d0,bus=pcie.0,addr=0x1 -device virtio-balloon-pci,id=c,bus=pcie.0,addr=1.0",
      "-device", "pcie.0 addr=0x1.0 is already used by 'b'"),
     (Q35 + f"{RP1} -device virtio-balloon-pci,id=c,bus=pcie.0,addr=1.2", "-device",
      "pcie.0 0x1.0 is a single-function device, so 0x1.2 cannot be populated"),
     (Q35 + f"-device virtio-balloon-pci,id=c,bus=pcie.0,addr=1.2 {RP1}", "-device",
      "0x1.0 without multifunction=on, but pcie.0 slot 0x1 already has other functions"),
     ("-serial stdio -chardev stdio,id=c", "-chardev", "only one device can be redirected to stdio"),
     ("-serial stdio -daemonize", "-daemonize", "stdio and -daemonize exclude each other"),
     ("-chardev stdio,id=c -daemonize", "-daemonize", "exclude each other"),
     (f"-incoming file:/snap {N0.replace('tap0', 'tap0,vhost=on')} {NIC}", "-incoming",
      "cannot restore a snapshot into a VM with vhost-net netdev 'n0'"),
     (f"-incoming file:/snap {BAL}", "-incoming", "with balloon device 'virtio-balloon-device'"),
     (Q35 + "-incoming tcp:1.2.3.4:5 -device vfio-pci,id=v,host=0000:00:01.0,bus=pcie.0,addr=1", "-incoming",
      "cannot migrate into a VM with vfio device 'v'"),
     ("-incoming unix:/m -machine microvm,mem-share=on -mem-path /hp", "-incoming",
      "with shared memory (mem-share=on), memory backend file (mem-path=/hp)")],
)
def test_cross_check_refusals(cmd, option, fragment):
    refuse(cmd, option, fragment)


def test_ids_are_unique_per_kind_not_across_kinds():
    # The manual itself names a drive and its device alike; StratoVirt keeps one map per kind.
    cfg = parse(Q35 + "-drive id=x,file=/a -device virtio-blk-pci,drive=x,id=x,bus=pcie.0,addr=2 "
                "-netdev tap,id=x,ifname=tap0 -device virtio-net-pci,netdev=x,id=y,bus=pcie.0,addr=3 "
                "-chardev pty,id=x")
    assert [d.id for d in cfg.drives] == ["x"] and cfg.devices[0].id == "x"


def test_read_only_drives_may_share_a_file():
    cfg = parse("-drive id=a,file=/img,readonly=on -drive id=b,file=/img,readonly=on "
                "-device virtio-blk-device,drive=a -device virtio-blk-device,drive=b")
    assert len(cfg.drives) == 2


def test_microvm_fills_every_slot():
    cmd = " ".join(f"-drive id=d{i},file=/d{i} -device virtio-blk-device,drive=d{i}" for i in range(MICROVM_MAX_BLK))
    cmd += " " + " ".join(f"-netdev tap,id=n{i},ifname=t{i} -device virtio-net-device,netdev=n{i}"
                          for i in range(MICROVM_MAX_NET))
    assert len(parse(cmd).devices) == MICROVM_MAX_BLK + MICROVM_MAX_NET


def test_multifunction_slot_with_function_zero_first():
    cfg = parse(Q35 + "-device pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=0x1,multifunction=on "
                "-device pcie-root-port,id=pcie.2,port=2,bus=pcie.0,addr=0x1.0x1")
    assert [d.addr for d in cfg.devices] == [8, 9]


def test_functions_may_precede_a_multifunction_function_zero():
    cfg = parse(Q35 + "-device virtio-balloon-pci,id=b,bus=pcie.0,addr=1.2 "
                "-device pcie-root-port,id=pcie.1,port=1,bus=pcie.0,addr=0x1,multifunction=on")
    assert [d.addr for d in cfg.devices] == [10, 8]


def test_incoming_without_excluded_features():
    assert parse(f"-incoming file:/snap {D0} {BLK}").incoming == "file:/snap"


# --- properties -------------------------------------------------------------------------------


_FRAGMENTS = [
    "microvm", "q35", "type=q35", "kvm", "test", "host", "-avx2", "4", "cpus=2", "maxcpus=4", "sockets=2",
    "cores=2", "threads=2", "dies=1", "1024", "1G", "size=2G", "id=d0", "id=n0", "id=c0", "file=/img",
    "readonly=on", "direct=off", "format=raw", "format=qcow2", "if=pflash", "tap", "ifname=tap0", "fd=3",
    "vhost=on", "queues=2", "stdio", "pty", "socket", "path=/tmp/s", "server", "nowait", "unix:/tmp/q",
    "tcp:1.2.3.4:5", "file:/snap", "virtio-blk-device", "virtio-blk-pci", "virtio-net-device",
    "virtio-net-pci", "virtio-balloon-device", "virtio-balloon-pci", "pcie-root-port", "vfio-pci",
    "virtio-serial-device", "virtconsole", "drive=d0", "netdev=n0", "chardev=c0", "bus=pcie.0",
    "bus=pcie.1", "addr=0x1", "addr=0x1.0x2", "multifunction=on", "mac=52:54:00:00:00:01", "port=1",
    "host=0000:00:01.0", "chardev:c0", "none", "nr=0", "=", ",", "", "0x", "\n", "é", "\udcff", "9" * 30,
]
_value = st.lists(st.sampled_from(_FRAGMENTS), min_size=0, max_size=4).map(",".join) | st.text(max_size=12)
_option = st.sampled_from(sorted(OPTIONS) + ["-object", "-M", "--m"])
_argv = st.lists(st.tuples(_option, _value, st.booleans()), max_size=10).map(
    lambda items: [x for opt, val, with_value in items for x in ([opt, val] if with_value else [opt])]
)


@settings(max_examples=400, deadline=None)
@given(_argv)
def test_random_argv_only_ever_raises_config_error(argv):
    try:
        cfg = parse_cmdline(argv)
    except ConfigError as err:
        text = str(err)
        assert text and "\n" not in text and "\r" not in text
        assert err.option and text.startswith(err.option + ": ")
    else:
        assert cfg.kernel is not None
        assert cfg.smp.cpus <= cfg.smp.maxcpus <= MAX_VCPUS


_small = st.integers(min_value=0, max_value=9)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20), _small, _small, st.integers(1, 3), st.integers(1, 3), _small, _small)
def test_smp_result_is_always_a_consistent_topology(cpus, maxcpus, sockets, dies, clusters, cores, threads):
    value = f"{cpus},maxcpus={maxcpus},sockets={sockets},dies={dies},clusters={clusters},cores={cores},threads={threads}"
    try:
        topo = parse(f"-smp {value}").smp
    except ConfigError as err:
        assert err.option == "-smp"
        return
    assert topo.cpus == cpus and topo.dies == dies and topo.clusters == clusters
    assert topo.sockets * topo.dies * topo.clusters * topo.cores * topo.threads == topo.maxcpus
    assert cpus <= topo.maxcpus <= MAX_VCPUS
    for given_value, got in ((maxcpus, topo.maxcpus), (sockets, topo.sockets), (cores, topo.cores), (threads, topo.threads)):
        assert given_value in (0, got)  # an explicit value is kept; 0 means "derive"


# Mostly well-formed options, so that the cross-checks (buses, slots, references) get exercised.
_ids = st.sampled_from(["x0", "x1", "x2", "pcie.1", "pcie.2"])
_dev_prop = st.sampled_from([
    "drive=d0", "drive=d1", "netdev=n0", "netdev=n1", "chardev=c0", "chardev=c1", "bus=pcie.0",
    "bus=pcie.1", "bus=pcie.2", "addr=0", "addr=1", "addr=0x1.0x1", "addr=2", "multifunction=on",
    "multifunction=off", "port=1", "port=2", "host=0000:00:01.0", "nr=0", "serial=S", "mac=02:00:00:00:00:01",
    "deflate-on-oom=on", "free-page-reporting=on",
])
_device = st.tuples(
    st.sampled_from(sorted(DRIVERS)),
    st.one_of(st.none(), _ids), st.lists(_dev_prop, max_size=4, unique=True),
).map(lambda t: ["-device", ",".join([t[0]] + ([f"id={t[1]}"] if t[1] else []) + t[2])])
_structured = st.lists(st.one_of(
    _device, _device, _device,
    st.sampled_from([["-drive", "id=d0,file=/a"], ["-drive", "id=d1,file=/b,readonly=on"],
                     ["-drive", "id=d1,file=/a,readonly=on"], ["-netdev", "tap,id=n0,ifname=tap0"],
                     ["-netdev", "tap,id=n1,fd=4,vhost=on"], ["-chardev", "pty,id=c0"],
                     ["-chardev", "stdio,id=c1"], ["-serial", "stdio"], ["-serial", "chardev:c0"],
                     ["-serial", "pty"], ["-incoming", "file:/snap"], ["-daemonize"],
                     ["-machine", "microvm,mem-share=on"], ["-qmp", "unix:/q,server,nowait"]]),
), max_size=12).map(lambda groups: [x for g in groups for x in g])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["microvm", "q35"]), _structured)
def test_structured_command_lines_parse_or_fail_cleanly(machine, argv):
    argv = KERNEL + (["-machine", machine] if "-machine" not in argv else []) + argv
    try:
        cfg = parse_cmdline(argv)
    except ConfigError as err:
        assert "\n" not in str(err) and err.option.startswith("-")
        return
    ids = [d.id for d in cfg.devices if d.id is not None]
    assert len(ids) == len(set(ids))
    assert sorted(d.drive for d in cfg.devices if d.drive) == sorted(d.id for d in cfg.drives)
    assert sorted(d.netdev for d in cfg.devices if d.netdev) == sorted(n.id for n in cfg.netdevs)
    placed = [(d.bus, d.addr) for d in cfg.devices if d.bus is not None]
    assert len(placed) == len(set(placed))
