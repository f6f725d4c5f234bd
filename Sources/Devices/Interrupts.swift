/// Where devices raise their interrupt lines: the in-kernel irqchip on the pc platform
/// (`KVM_IRQ_LINE`), nothing on the payload platform (no interrupt controller).
public protocol InterruptLines: Sendable {
    /// Drives ISA line `irq` to `level`. Edge-triggered lines (the PIC's default) take an
    /// interrupt on the rising edge.
    func set(irq: UInt32, level: Bool)
}

/// No interrupt controller: lines go nowhere (the payload platform).
public struct NoInterruptLines: InterruptLines {
    public init() {}
    public func set(irq: UInt32, level: Bool) {}
}
