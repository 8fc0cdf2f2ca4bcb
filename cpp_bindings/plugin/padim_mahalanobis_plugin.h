// edgead: TensorRT plugin "PadimMahalanobis" (namespace "", version "1") around edgead_padim_mahalanobis.
//
// Node (docs/CONTRACTS.md, ONNX graph I/O): inputs
//   0 embedding        [N, D, P] float32
//   1 mean             [P, D]    float32 (initializer -> constant)
//   2 whitening_packed [P, T]    float16 or float32 (initializer -> constant), T = D(D+1)/2
// output 0 distance    [N, P]    float32.
// Fields: plugin_version ("1"), dim (D), num_patches (P), whitening_dtype (ONNX TensorProto code of input 2 as
// stored in the file: 1 = float32, 10 = float16). Input 2 is accepted only in that type, so the builder can
// neither round fp32 statistics to fp16 under --fp16 nor widen fp16 statistics to fp32 (twice the memory).
//
// One source, two interfaces, chosen by NV_TENSORRT_MAJOR:
//   >= 10: IPluginV3 (IPluginV3OneCore/Build/Runtime) + IPluginCreatorV3One   (JetPack 6.1+, x86 TRT 10/11)
//   <  10: IPluginV2DynamicExt + IPluginCreator                                (TensorRT 8.5/8.6: JetPack 5, 6.0)
#ifndef EDGEAD_PADIM_MAHALANOBIS_PLUGIN_H
#define EDGEAD_PADIM_MAHALANOBIS_PLUGIN_H

#include <NvInfer.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <string>
#include <vector>

#if NV_TENSORRT_MAJOR < 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR < 5)
#error "edgead PadimMahalanobis plugin needs TensorRT >= 8.5"
#endif

#define EDGEAD_TRT_V3 (NV_TENSORRT_MAJOR >= 10)

namespace edgead {

constexpr char const* kPluginName = "PadimMahalanobis";
constexpr char const* kPluginVersion = "1";

//! ONNX TensorProto data type codes carried by the whitening_dtype field.
constexpr int32_t kOnnxFloat = 1;
constexpr int32_t kOnnxFloat16 = 10;

//! Attributes of one node: D, P and the stored dtype of the statistics (the only state the plugin has).
struct PadimParams {
    int32_t dim{0};
    int32_t numPatches{0};
    int32_t whiteningDtype{0};  //!< kOnnxFloat or kOnnxFloat16
};

#if EDGEAD_TRT_V3

class PadimMahalanobisPlugin : public nvinfer1::IPluginV3,
                               public nvinfer1::IPluginV3OneCore,
                               public nvinfer1::IPluginV3OneBuild,
                               public nvinfer1::IPluginV3OneRuntime {
public:
    explicit PadimMahalanobisPlugin(PadimParams params);
    ~PadimMahalanobisPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                            nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs,
                            int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    PadimParams mParams;
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialCollection{};
};

class PadimMahalanobisPluginCreator : public nvinfer1::IPluginCreatorV3One {
public:
    PadimMahalanobisPluginCreator();
    ~PadimMahalanobisPluginCreator() override = default;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

#else  // TensorRT 8.5 / 8.6

class PadimMahalanobisPlugin : public nvinfer1::IPluginV2DynamicExt {
public:
    explicit PadimMahalanobisPlugin(PadimParams params);
    ~PadimMahalanobisPlugin() override = default;

    // IPluginV2DynamicExt
    nvinfer1::IPluginV2DynamicExt* clone() const noexcept override;
    nvinfer1::DimsExprs getOutputDimensions(int32_t outputIndex, nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::PluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    void configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                         nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::PluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::PluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;

    // IPluginV2Ext
    nvinfer1::DataType getOutputDataType(int32_t index, nvinfer1::DataType const* inputTypes,
                                         int32_t nbInputs) const noexcept override;

    // IPluginV2
    char const* getPluginType() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    int32_t getNbOutputs() const noexcept override;
    int32_t initialize() noexcept override;
    void terminate() noexcept override;
    size_t getSerializationSize() const noexcept override;
    void serialize(void* buffer) const noexcept override;
    void destroy() noexcept override;
    void setPluginNamespace(char const* pluginNamespace) noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    PadimParams mParams;
    std::string mNamespace;
    std::string mShapeProblem;  //!< set by configurePlugin; initialize() and enqueue() refuse to run with it
};

class PadimMahalanobisPluginCreator : public nvinfer1::IPluginCreator {
public:
    PadimMahalanobisPluginCreator();
    ~PadimMahalanobisPluginCreator() override = default;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV2* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc) noexcept override;
    nvinfer1::IPluginV2* deserializePlugin(char const* name, void const* serialData,
                                           size_t serialLength) noexcept override;
    void setPluginNamespace(char const* pluginNamespace) noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
    std::string mNamespace;
};

#endif  // EDGEAD_TRT_V3

}  // namespace edgead

#endif  // EDGEAD_PADIM_MAHALANOBIS_PLUGIN_H
